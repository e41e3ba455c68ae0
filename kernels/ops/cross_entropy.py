"""Fused softmax cross-entropy: ``kernels.cross_entropy`` and ``kernels.FusedCrossEntropyLoss``.

The semantics are ``F.cross_entropy`` / ``nn.CrossEntropyLoss`` with class-index targets. For a
row x of C logits with target t, class weights w (all ones without ``weight``) and label
smoothing eps, PyTorch's loss is::

    loss = (1 - eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c),    lse = log sum_c exp(x_c)

"mean" divides the sum over rows by the sum of w_t over the rows whose target is not
``ignore_index`` (the count of those rows without a weight); such rows add 0 and are left out.

The forward kernel reads each row once for its log-sum-exp (online softmax) and once more,
from cache, to write the gradient already scaled for the reduction, in the same launch. The
backward only multiplies that gradient by grad_output, and skips even that when it is 1; no
(N, C) buffer exists besides the gradient, and ``inplace_backward=True`` writes the gradient
over the logits. ``cross_entropy_reference`` is the same computation in plain PyTorch (the
``KERNELS_BACKEND=torch`` path).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from kernels._dispatch import backend_for, check_tensor, implementation
from kernels.cpu import dtype_name as cpp_dtype, extension as cpp, num_threads


def triton_op(name):
    return implementation(name, "triton")

_OP = "cross_entropy"
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                  inplace_backward: bool = False) -> torch.Tensor:
    """``F.cross_entropy(logits, target, weight, ignore_index=..., reduction=..., label_smoothing=...)``
    for class-index targets, fused: logits (N, C) or (C,), target (N,) or () of integers.

    The loss is computed in float32 (float64 for float64 logits) and returned in the logits'
    dtype, as PyTorch does. Backends: Triton on CUDA (float32, bfloat16, float16), C++ on CPU
    (float32, float64), plain PyTorch elsewhere (see ``kernels._dispatch``).

    ``inplace_backward=True`` writes the gradient over ``logits`` during the forward (no second
    (N, C) buffer): the logits' values are gone afterwards, so use it only when nothing else
    needs them (e.g. logits straight out of a Linear layer, which saves its input, not its output).
    For leaf logits, ``.grad`` then lives in the logits' memory.
    A second backward through the same graph (retain_graph=True) recomputes the gradient from
    the logits if they still exist unchanged, and raises otherwise.

    Targets out of range: a target that is neither ``ignore_index`` nor in [0, C) is an error.
    On the CPU (every backend) the call raises ``ValueError`` naming the row. On CUDA the check
    costs no host synchronisation: the kernel never reads out of bounds for such a row, writes NaN
    as its loss and gradient, and ``torch._assert_async`` on a device-side flag fails the stream
    like PyTorch's own device-side assert: the next synchronising CUDA call (``.item()``,
    ``torch.cuda.synchronize()``, a copy to the CPU) raises ``RuntimeError`` with "device-side
    assert triggered", and the CUDA context is unusable afterwards. Run with
    ``CUDA_LAUNCH_BLOCKING=1`` to get the error at the call itself.

    Other bad arguments raise at the call: TypeError for a non-tensor, floating/bool target or a
    weight of another dtype; ValueError for shapes (N vs target, weight of length other than C),
    devices, an unknown reduction, label_smoothing outside [0, 1].
    """
    backend = backend_for(logits) if isinstance(logits, torch.Tensor) else None
    check_tensor(_OP, "logits", logits, backend=backend, dim=(1, 2))
    source, unbatched = logits, logits.dim() == 1
    if unbatched:
        logits = logits.unsqueeze(0)
    target = _checked_target(logits, target, unbatched)
    N, C = logits.shape
    if weight is not None:
        _check_weight(logits, weight)
    code = _REDUCTIONS.get(reduction)
    if code is None:
        raise ValueError(f"{_OP}: reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if C == 0:
        raise ValueError(f"{_OP}: logits have no classes (shape {tuple(logits.shape)})")

    impl = _BACKENDS[backend]
    ignore_index = int(ignore_index)
    if weight is not None:
        weight = weight.contiguous()
    if logits.requires_grad and torch.is_grad_enabled():
        options = (ignore_index, label_smoothing, code, inplace_backward, (weakref.ref(source), source._version))
        loss = _FusedCrossEntropy.apply(logits.contiguous(), target, weight, options, impl)
    else:
        loss = impl.forward(logits.contiguous(), target, weight, ignore_index, label_smoothing, code, None)
    return loss.view(()) if unbatched and code == 0 else loss


class FusedCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (same arguments, ``weight`` buffer and state_dict) computed by
    ``kernels.cross_entropy``; ``inplace_backward=True`` writes the gradient over the logits
    (see ``cross_entropy``). Class-index targets only."""

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


def _scaled_grad(ctx, grad_output):
    grad = ctx.grad
    if grad is None:
        grad = _recomputed_grad(ctx)
    ctx.grad = None
    ctx.impl.scale_grad(grad, grad_output)
    return grad, None, None, None, None


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward: loss and the reduction-scaled gradient in one kernel. Backward: that gradient
    times grad_output, in place."""

    @staticmethod
    def forward(ctx, logits, target, weight, options, impl):
        ignore_index, label_smoothing, reduction, inplace, source = options
        # In place, the gradient is a new tensor over the logits' memory: handed back as the very
        # tensor autograd got as input, a leaf's AccumulateGrad would copy it instead of keeping it.
        grad = logits.detach() if inplace else torch.empty_like(logits)
        loss = impl.forward(logits, target, weight, ignore_index, label_smoothing, reduction, grad)
        ctx.grad, ctx.target, ctx.weight, ctx.options, ctx.impl = grad, target, weight, options, impl
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return _scaled_grad(ctx, grad_output)


def _recomputed_grad(ctx) -> torch.Tensor:
    """The gradient for a second backward through the same graph (retain_graph=True, gradcheck):
    the first backward handed out the only copy, so it is computed again from the caller's logits,
    which are only weakly referenced (keeping them alive would cost an (N, C) buffer)."""
    ignore_index, label_smoothing, reduction, inplace, (source, version) = ctx.options
    logits = source()
    if inplace or logits is None or logits._version != version:
        raise RuntimeError(f"{_OP}: a second backward through the same graph needs the gradient again, but the "
                           "logits it came from are gone, were modified or were overwritten (inplace_backward=True)")
    logits = logits.reshape(-1, logits.shape[-1]).contiguous()
    grad = torch.empty_like(logits)
    ctx.impl.forward(logits, ctx.target, ctx.weight, ignore_index, label_smoothing, reduction, grad)
    return grad


# ---------------------------------------------------------------------------------------------
# Input checks (the kernels trust their inputs)

def _checked_target(logits: torch.Tensor, target, unbatched: bool) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{_OP}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INDEX_DTYPES:
        kind = "class probabilities (floating targets) are not supported" if target.is_floating_point() else ""
        raise TypeError(f"{_OP}: target must hold class indices (an integer dtype), got {target.dtype}"
                        + (f"; {kind}" if kind else ""))
    want = () if unbatched else (logits.shape[0],)
    if target.shape != want:
        raise ValueError(f"{_OP}: target of shape {tuple(target.shape)} does not match logits of shape "
                         f"{tuple(logits.shape[1:] if unbatched else logits.shape)} (expected {want})")
    if target.device != logits.device:
        raise ValueError(f"{_OP}: target is on {target.device} but logits are on {logits.device}")
    return target.reshape(1) if unbatched else target


def _check_weight(logits: torch.Tensor, weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{_OP}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.shape != logits.shape[1:]:
        raise ValueError(f"{_OP}: weight must have one entry per class, shape ({logits.shape[1]},), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != logits.dtype:
        raise TypeError(f"{_OP}: weight has dtype {weight.dtype} but logits have dtype {logits.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"{_OP}: weight is on {weight.device} but logits are on {logits.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_OP}: gradients with respect to weight are not supported (detach it)")


def _bad_target_error(target: torch.Tensor, row: int, C: int, ignore_index: int) -> ValueError:
    return ValueError(f"{_OP}: target[{row}] = {int(target[row])} is out of range for {C} classes "
                      f"(valid: 0..{C - 1}, or ignore_index={ignore_index})")


def _report_bad_targets(ok: torch.Tensor, target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Raise for an invalid target: at once on the CPU, as a device-side assert on CUDA."""
    if ok.device.type == "cpu":
        if not ok.item():
            bad = (target != ignore_index) & ((target < 0) | (target >= C))
            raise _bad_target_error(target, int(bad.nonzero()[0, 0]), C, ignore_index)
    else:
        torch._assert_async(ok.view(()), f"{_OP}: a target is out of range [0, {C}) and is not ignore_index")


# ---------------------------------------------------------------------------------------------
# Backends: forward(logits, target, weight, ignore_index, label_smoothing, reduction, grad) -> loss
# with contiguous (N, C) logits, reduction 0/1/2 = none/sum/mean and grad (N, C) or None; and
# scale_grad(grad, grad_output) in place.

class _Cpp:
    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, reduction, grad):
        N, C = logits.shape
        if target.dtype != torch.int64 or not target.is_contiguous():
            target = target.to(torch.int64, memory_format=torch.contiguous_format)
        loss = logits.new_empty(N) if reduction == 0 else logits.new_empty(size=())  # the fastest spellings
        bad_row = cpp().cross_entropy_forward(
            cpp_dtype(logits), logits.data_ptr(), target.data_ptr(), 0 if weight is None else weight.data_ptr(),
            loss.data_ptr(), 0 if grad is None else grad.data_ptr(), N, C, ignore_index, label_smoothing,
            reduction, num_threads())
        if bad_row >= 0:
            raise _bad_target_error(target, bad_row, C, ignore_index)
        return loss

    @staticmethod
    def scale_grad(grad, grad_output):
        N, C = grad.shape
        cpp().cross_entropy_scale_grad(cpp_dtype(grad), grad.data_ptr(), grad_output.data_ptr(),
                                       grad_output.stride(0) if grad_output.dim() else 0, N, C, num_threads())


class _Triton:
    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, reduction, grad):
        if target.dtype not in (torch.int64, torch.int32) or not target.is_contiguous():
            target = target.to(torch.int64, memory_format=torch.contiguous_format)
        loss, ok = triton_op(_OP).forward(logits, target, weight, ignore_index, label_smoothing, reduction, grad)
        _report_bad_targets(ok, target, logits.shape[1], ignore_index)
        return loss

    @staticmethod
    def scale_grad(grad, grad_output):
        triton_op(_OP).scale_grad(grad, grad_output.to(grad.dtype))


class _Torch:
    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, reduction, grad):
        loss, ok = cross_entropy_reference(logits, target, weight, ignore_index, label_smoothing, reduction, grad)
        _report_bad_targets(ok, target, logits.shape[1], ignore_index)
        return loss

    @staticmethod
    def scale_grad(grad, grad_output):
        grad.mul_(grad_output.view(-1, 1) if grad_output.dim() else grad_output)


_BACKENDS = {"cpu": _Cpp, "triton": _Triton, "torch": _Torch}


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                            ignore_index: int, label_smoothing: float, reduction: int,
                            grad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels compute, in plain PyTorch: the loss of (N, C) logits for reduction 0/1/2
    (none/sum/mean) in the logits' dtype, and a one-element flag that every target was valid;
    fills ``grad`` (may be ``logits``) with dloss/dlogits. A row with an out-of-range target gets
    NaN loss and gradient, a row with ignore_index 0."""
    N, C = logits.shape
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    counted = target != ignore_index
    valid = counted & (target >= 0) & (target < C)
    t = torch.where(valid, target, 0).long()
    w = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    w_t = w[t]
    fill = torch.where(counted, float("nan"), 0.0).to(x.dtype)
    eps = label_smoothing
    log_p = torch.log_softmax(x, 1)
    nll = -log_p.gather(1, t[:, None])[:, 0]
    smooth = -(log_p * w).sum(1)
    rows = torch.where(valid, (1 - eps) * w_t * nll + eps / C * smooth, fill)
    denominator = torch.where(valid, w_t, 0).sum()
    scale = 1 / denominator if reduction == 2 else torch.ones((), dtype=x.dtype, device=x.device)
    if grad is not None:
        dx = log_p.exp() * ((1 - eps) * w_t + eps / C * w.sum())[:, None] - eps / C * w
        dx.scatter_add_(1, t[:, None], -((1 - eps) * w_t)[:, None])
        grad.copy_(torch.where(valid[:, None], dx * scale, fill[:, None]))
    loss = rows if reduction == 0 else (rows.sum() / denominator if reduction == 2 else rows.sum())
    ok = ~(counted & ~valid).any()
    return loss.to(logits.dtype), ok
