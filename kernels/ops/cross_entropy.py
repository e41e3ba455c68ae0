"""Fused softmax cross-entropy: ``kernels.cross_entropy`` and ``kernels.FusedCrossEntropyLoss``.

The semantics are ``F.cross_entropy`` / ``nn.CrossEntropyLoss``. The kernels take rows of C
logits with class-index targets: (N, C) logits, (C,) as one row, and (N, C, d1, ..., dk) as
N * d1 * ... * dk rows (the class axis moved last, a copy unless it already is). Targets of class
probabilities (floating, shaped like the logits) run PyTorch's own ``F.cross_entropy``: there is
no fused kernel for them. For a row x of C logits with target t, class weights w (all ones
without ``weight``) and label smoothing eps, PyTorch's loss is::

    loss = (1 - eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c),    lse = log sum_c exp(x_c)

"mean" divides the sum over rows by the sum of w_t over the rows whose target is not
``ignore_index`` (the count of those rows without a weight); such rows add 0 and are left out.
With the reduction's scale s (1/that sum for "mean", 1 otherwise) and p = softmax(x)::

    forward    loss, and dx_j = s [ p_j ((1 - eps) w_t + eps/C sum_c w_c) - eps/C w_j - (1 - eps) w_t [j == t] ]
               in one pass over the logits (read once for the log-sum-exp, once more from cache)
    backward   dx * grad_output, in place

No (N, C) buffer exists besides the gradient, and ``inplace_backward=True`` writes the gradient
over the logits. Each backend's module (kernels/{triton,cpu,reference}/cross_entropy.py) has the
same ``forward`` and ``backward``; the reference's differentiable ``gradient`` runs when a graph
of the gradient itself is being built (``create_graph=True``: gradient penalties, Hessian-vector
products).

Under ``torch.compile`` the autograd Function calls its backend through the custom ops
``torch.ops.kernels.cross_entropy_forward`` / ``cross_entropy_backward`` (with fake
implementations), so a compiled model and its loss trace without a graph break; eager calls
launch directly.
"""
from __future__ import annotations

import numbers
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from kernels._dispatch import (SUPPORTED_DTYPES, backend_for, check_same, check_tensor, get_backend, implementation,
                               same_device)
from kernels.reference import cross_entropy as reference

OP = "cross_entropy"
REDUCTIONS = reference.REDUCTIONS
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
INT64 = torch.iinfo(torch.int64)
# Logits below which a CPU call runs F.cross_entropy itself, unless a backend is forced or
# inplace_backward asks for the gradient in the logits' memory: there the Python of an
# autograd.Function and its backward (about 30 us) costs more than the fused kernel saves
# (forward + backward on 2 cores of an AVX2-only Zen 3: ours 0.69-0.77x PyTorch's from 10 to
# 10,240 logits, 0.93x at 51,200, 1.10-1.14x from 64,000). The MNIST MLP's batch is 640.
SMALL_CPU_LOGITS = 1 << 15


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  inplace_backward: bool = False) -> torch.Tensor:
    """``F.cross_entropy(logits, target, weight, ignore_index=..., reduction=..., label_smoothing=...)``,
    fused for class-index targets: logits (N, C), (C,) or (N, C, d1, ..., dk) with targets (N,),
    () or (N, d1, ..., dk) of integers; "none" returns the target's shape. Floating targets (class
    probabilities, shaped like the logits) are computed by ``F.cross_entropy`` itself, where
    ``inplace_backward`` has no effect.

    The loss is computed in float32 (float64 for float64 logits) from ``x - max(x)``, as
    log_softmax is, and returned in the logits' dtype. Backends: Triton on CUDA (float32,
    bfloat16, float16; float64 too), C++ on CPU (float32, float64; ``F.cross_entropy`` itself
    below SMALL_CPU_LOGITS logits unless a backend is forced or ``inplace_backward`` is set),
    plain PyTorch elsewhere (see ``kernels._dispatch``). Tensors of any strides are accepted
    (copied once when not contiguous).

    ``inplace_backward=True`` writes the gradient over ``logits`` during the forward (no second
    (N, C) buffer), and bumps their version counter: a node that saved the logits for its own
    backward (``nn.ReLU``, ``FusedLinear``) then raises autograd's "modified by an inplace
    operation" error instead of computing with the gradient. Logits straight out of a linear layer
    without activation (it saves its input, not its output) are the intended use. For leaf logits,
    ``.grad`` then lives in the logits' memory. Under ``torch.compile`` the gradient gets a buffer
    of its own.

    A second backward through the same graph (``retain_graph=True``) and a backward that builds a
    graph of the gradient (``create_graph=True``: double backward) recompute the gradient from the
    logits, which are only weakly referenced (keeping them alive would cost an (N, C) buffer): they
    must still exist unchanged, so hold a reference to them; otherwise it raises RuntimeError
    (``F.cross_entropy``, which small CPU calls run, keeps what it needs itself).

    Targets out of range: a target that is neither ``ignore_index`` nor in [0, C) is an error.
    On the CPU (every backend) the call raises ``ValueError`` naming the row. On CUDA the check
    costs no host synchronisation: the kernel never reads out of bounds for such a row, writes NaN
    as its loss and gradient, and ``torch._assert_async`` on a device-side flag fails the stream
    like PyTorch's own device-side assert: the next synchronising CUDA call (``.item()``,
    ``torch.cuda.synchronize()``, a copy to the CPU) raises ``RuntimeError`` with "device-side
    assert triggered", and the CUDA context is unusable afterwards. Run with
    ``CUDA_LAUNCH_BLOCKING=1`` to get the error at the call itself.

    NaN and inf follow PyTorch: a row holding a NaN or +inf logit, or only -inf logits, has NaN
    loss and gradient; an ignored row has loss 0 and a gradient of 0, or of NaN for such a row.

    Other bad arguments raise at the call, as PyTorch's do: TypeError for a non-tensor, a
    floating/bool target, a weight of another dtype, a non-integer ``ignore_index`` (float, bool)
    or a non-number ``label_smoothing``; ValueError for shapes (N vs target, weight of length
    other than C), devices, an unknown reduction, label_smoothing outside [0, 1], an
    ``ignore_index`` outside int64.
    """
    if _small_on_cpu(logits, target, weight, ignore_index, label_smoothing, inplace_backward):
        return _small(logits, target, weight, ignore_index, reduction, label_smoothing)
    if isinstance(target, torch.Tensor) and target.is_floating_point():  # class probabilities
        return F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    backend, ignore_index, label_smoothing = _check(logits, target, weight, ignore_index, reduction, label_smoothing)
    if backend == "cpu" and logits.numel() < SMALL_CPU_LOGITS and not inplace_backward and get_backend() is None:
        return _small(logits, target, weight, ignore_index, reduction, label_smoothing)
    shape = target.shape  # the loss's with "none"
    x = _as_rows(logits)
    # one row's target each, dense (a strided or expanded one: labels[:, 0], t.expand(n))
    target = (target if target.dim() == 1 else target.reshape(-1)).contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        source = None if torch.compiler.is_compiling() else _WeakLogits(logits)
        loss = CrossEntropyFunction.apply(x, target, weight, ignore_index, label_smoothing, reduction,
                                          inplace_backward, backend, source)
    else:  # nothing to differentiate: no gradient is computed
        loss = _loss_only(x, target, weight, ignore_index, label_smoothing, reduction, backend)
    return loss.view(shape) if reduction == "none" else loss


def _small_on_cpu(logits, target, weight, ignore_index, label_smoothing, inplace_backward) -> bool:
    """Whether the call is a small CPU one in its most common form (no weight, int64 targets one
    dimension short of the logits, options of their default types), whose other checks
    ``F.cross_entropy`` makes itself: then ``_check``'s 1.5-2 us are spent only where it refuses
    the arguments (a (64, 10) batch's loss and its backward take about 80 us here). What it
    lets through and we refuse is checked here: (C,) logits with a (1,) target, a negative
    label_smoothing."""
    return (weight is None and not inplace_backward and isinstance(logits, torch.Tensor) and logits.is_cpu
            and isinstance(target, torch.Tensor) and target.dtype is torch.int64 and type(ignore_index) is int
            and type(label_smoothing) is float and 0.0 <= label_smoothing and logits.numel() < SMALL_CPU_LOGITS
            and logits.dim() == target.dim() + 1 and logits.dtype in SUPPORTED_DTYPES["cpu"]
            and get_backend() is None)


def _small(logits, target, weight, ignore_index, reduction, label_smoothing) -> torch.Tensor:
    """The loss by PyTorch's own op, on autograd's own nodes; where it refuses the arguments, the
    error ``_check`` raises for them, or for a target out of range the one the kernels raise."""
    try:
        return F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    except (RuntimeError, ValueError, TypeError, IndexError):
        _, ignore_index, _ = _check(logits, target, weight, ignore_index, reduction, label_smoothing)
        error = reference.first_bad_target_error(target.reshape(-1), logits.shape[0 if logits.dim() == 1 else 1],
                                                 ignore_index)
        if error is None:
            raise
        raise error from None


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    """(C,), (N, C) or (N, C, d1, ..., dk) logits as the contiguous (rows, C) the kernels take."""
    if logits.dim() == 2:  # the common case, without a reshape's 0.3 us
        return logits.contiguous()
    if logits.dim() > 2:
        logits = logits.movedim(1, -1)
    return logits.reshape(-1, logits.shape[-1]).contiguous()


def _check(logits, target, weight, ignore_index, reduction, label_smoothing) -> tuple[str, int, float]:
    """Validates the arguments of ``cross_entropy``; returns (backend, ignore_index, label_smoothing)
    as the kernels take them. The common case ((N, C) logits of a dtype the backend computes,
    their (N,) class indices on the same device, no weight, default-typed options) is recognised
    in one expression; anything else goes through the checks one by one, which name what is wrong."""
    if (weight is None and type(ignore_index) is int and type(label_smoothing) is float
            and isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)):
        backend = backend_for(logits)
        shape = logits.shape
        if (len(shape) == 2 and shape[1] > 0 and target.shape == shape[:1] and target.dtype in INDEX_DTYPES
                and logits.dtype in SUPPORTED_DTYPES.get(backend, ()) and same_device(logits, target)
                and reduction in REDUCTIONS and 0.0 <= label_smoothing <= 1.0
                and INT64.min <= ignore_index <= INT64.max):
            return backend, ignore_index, label_smoothing
    return _check_each(logits, target, weight, ignore_index, reduction, label_smoothing)


def _check_each(logits, target, weight, ignore_index, reduction, label_smoothing) -> tuple[str, int, float]:
    backend = backend_for(logits) if isinstance(logits, torch.Tensor) else None
    check_tensor(OP, "logits", logits, backend=backend)
    if logits.dim() == 0:
        raise ValueError(f"{OP}: logits must have 1 or more dimensions ((C,), (N, C) or (N, C, d1, ...)), got a scalar")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{OP}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"{OP}: target must hold class indices (an integer dtype) or class probabilities (a "
                        f"floating dtype), got {target.dtype}")
    want = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
    if target.shape != want:
        raise ValueError(f"{OP}: target of shape {tuple(target.shape)} does not match logits of shape "
                         f"{tuple(logits.shape)} (expected {want})")
    if target.device != logits.device:
        raise ValueError(f"{OP}: target is on {target.device} but logits are on {logits.device}")
    C = logits.shape[0 if logits.dim() == 1 else 1]
    if C == 0:
        raise ValueError(f"{OP}: logits have no classes (shape {tuple(logits.shape)})")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{OP}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.shape != (C,):
            raise ValueError(f"{OP}: weight must have one entry per class, shape ({C},), got {tuple(weight.shape)}")
        check_same(OP, logits=logits, weight=weight)
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{OP}: gradients with respect to weight are not supported (detach it)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    # ignore_index as PyTorch's argument parser takes an int: anything with __index__ but a bool.
    if isinstance(ignore_index, bool) or not hasattr(type(ignore_index), "__index__"):
        raise TypeError(f"{OP}: ignore_index must be int, not {type(ignore_index).__name__}")
    ignore_index = operator.index(ignore_index)
    if not INT64.min <= ignore_index <= INT64.max:
        raise ValueError(f"{OP}: ignore_index={ignore_index} does not fit in int64")
    if not isinstance(label_smoothing, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{OP}: label_smoothing must be float, not {type(label_smoothing).__name__}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    return backend, ignore_index, label_smoothing


def _loss_only(logits, target, weight, ignore_index, label_smoothing, reduction, backend):
    if torch.compiler.is_compiling():
        return torch.ops.kernels.cross_entropy_forward(logits, target, weight, ignore_index, label_smoothing,
                                                       reduction, backend, False)[0]
    return implementation(OP, backend).forward(logits, target, weight, ignore_index, label_smoothing, reduction, None)


class CrossEntropyFunction(torch.autograd.Function):
    """The loss of (N, C) logits on one backend. The forward also computes the gradient for
    grad_output = 1; the backward multiplies it by grad_output on the same backend."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction, inplace, backend, source):
        if torch.compiler.is_compiling():
            loss, grad = torch.ops.kernels.cross_entropy_forward(logits, target, weight, ignore_index,
                                                                 label_smoothing, reduction, backend, True)
        else:
            # In place, the gradient is a new tensor over the logits' memory: handed back as the very
            # tensor autograd got as input, a leaf's AccumulateGrad would copy it instead of keeping it.
            grad = logits.detach() if inplace else torch.empty_like(logits)
            loss = implementation(OP, backend).forward(logits, target, weight, ignore_index, label_smoothing,
                                                       reduction, grad)
            if inplace:  # the logits now hold the gradient: a node that saved them must not use them
                torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(target, weight)
        ctx.grad, ctx.source = grad, source
        ctx.options = (ignore_index, label_smoothing, reduction, backend)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        target, weight = ctx.saved_tensors
        ignore_index, label_smoothing, reduction, backend = ctx.options
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable itself
            logits = _recover(ctx.source, "a backward with create_graph=True (double backward)")
            grad = reference.gradient(logits, target, weight, ignore_index, label_smoothing, reduction, grad_output)
        elif torch.compiler.is_compiling():
            grad = ctx.grad
            torch.ops.kernels.cross_entropy_backward(grad, grad_output, backend)
        else:
            grad = ctx.grad
            if grad is None:  # the first backward handed out the only copy
                logits = _recover(ctx.source, "a second backward through the same graph")
                grad = torch.empty_like(logits)
                implementation(OP, backend).forward(logits, target, weight, ignore_index, label_smoothing, reduction,
                                                    grad)
            implementation(OP, backend).backward(grad, grad_output)
        ctx.grad = None
        return grad, None, None, None, None, None, None, None, None


class _WeakLogits:
    """A weak reference to the caller's logits and their version at the call, from which the
    gradient can be computed again."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.ref, self.version = weakref.ref(logits), logits._version


def _recover(source: _WeakLogits | None, needed_by: str) -> torch.Tensor:
    """The caller's logits as the (N, C) input of CrossEntropyFunction, or a RuntimeError saying why not."""
    logits = None if source is None else source.ref()
    if logits is None or logits._version != source.version:
        raise RuntimeError(f"{OP}: {needed_by} computes the gradient again from the logits, but they are gone, "
                           "were modified or were overwritten by inplace_backward=True; keep a reference to the "
                           "logits, unchanged, until then (and do not use inplace_backward)")
    return _as_rows(logits)


# The backend calls as custom ops, for torch.compile. An op returns tensors only, so a gradient
# that is not computed comes back as an empty tensor.
@torch.library.custom_op("kernels::cross_entropy_forward", mutates_args=(),
                         schema="(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
                                "float label_smoothing, str reduction, str backend, bool compute_grad) "
                                "-> (Tensor, Tensor)")
def _cross_entropy_forward_op(logits, target, weight, ignore_index, label_smoothing, reduction, backend, compute_grad):
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    loss = implementation(OP, backend).forward(logits, target, weight, ignore_index, label_smoothing, reduction,
                                               grad if compute_grad else None)
    return loss, grad


@_cross_entropy_forward_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, backend, compute_grad):
    loss = logits.new_empty(logits.shape[0] if reduction == "none" else ())
    return loss, torch.empty_like(logits) if compute_grad else logits.new_empty(0)


@torch.library.custom_op("kernels::cross_entropy_backward", mutates_args=("grad",),
                         schema="(Tensor(a!) grad, Tensor grad_output, str backend) -> ()")
def _cross_entropy_backward_op(grad, grad_output, backend):
    implementation(OP, backend).backward(grad, grad_output)


@_cross_entropy_backward_op.register_fake
def _(grad, grad_output, backend):
    return None


class FusedCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (same arguments, ``weight`` buffer and state_dict) computed by
    ``kernels.cross_entropy``; ``inplace_backward=True`` writes the gradient over the logits
    (see ``cross_entropy``). Targets of class probabilities run ``F.cross_entropy`` itself."""

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                 inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return f"inplace_backward={self.inplace_backward}" if self.inplace_backward else ""
