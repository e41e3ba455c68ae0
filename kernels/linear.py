"""Fused Linear + bias + activation: ``kernels.linear`` and ``kernels.FusedLinear``.

``linear(x, weight, bias, activation)`` is ``act(F.linear(x, weight, bias))`` for x of shape
(*, in_features), with activation "relu", "none", "sigmoid" or "tanh"::

    forward    y  = act(x W^T + b)           one GEMM kernel, bias and activation in its epilogue
    backward   dz = dy * act'(y)             relu: y > 0, sigmoid: y (1 - y), tanh: 1 - y^2
               dx = dz W,  dW = dz^T x,  db = sum of dz over the batch

The forward saves only its output y (nothing for "none"): every act' above is a function of y.
The backward forms dz while loading the GEMM operands, sums db inside the dW kernel, and skips
the GEMMs of inputs that need no gradient. ``linear_reference`` is the same computation in plain
PyTorch (the ``KERNELS_BACKEND=torch`` path).

Under ``torch.compile`` the autograd Function calls its kernels through the custom ops
``torch.ops.kernels.linear_forward`` / ``linear_backward`` (with fake implementations), so a
compiled model traces through the layer without a graph break; eager calls skip the op
dispatcher and launch directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels._dispatch import (SUPPORTED_DTYPES, backend_for, check_same, check_tensor, cpp, cpp_dtype, num_threads,
                               once_differentiable_backward, triton_op)

_OP = "linear"
ACTIVATIONS = ("relu", "none", "sigmoid", "tanh")
_TORCH_ACTIVATIONS = {"relu": torch.relu, "none": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str = "relu") -> torch.Tensor:
    """Plain PyTorch: ``act(F.linear(x, weight, bias))``."""
    return _TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "relu") -> torch.Tensor:
    """``act(x @ weight.T + bias)``, fused, with the shapes of ``F.linear``: x (*, in_features),
    weight (out_features, in_features), bias (out_features,) or None; returns (*, out_features).

    Backends: Triton on CUDA (float32, bfloat16, float16), C++ on CPU (float32, float64), plain
    PyTorch elsewhere (see ``kernels._dispatch``). Raises TypeError/ValueError naming the
    offending shapes, dtypes, devices or activation.
    """
    backend = _check(x, weight, bias, activation)
    if backend == "torch":
        return linear_reference(x, weight, bias, activation)
    batched = x.dim() == 2
    x2d = x if batched else x.reshape(-1, x.shape[-1])
    if backend == "cpu":  # the C++ kernels take contiguous tensors; Triton takes strides
        x2d, weight = x2d.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _LinearFunction.apply(x2d, weight, bias, activation, backend)
    else:
        y = _forward(x2d, weight, bias, activation, backend)
    return y if batched else y.reshape(*x.shape[:-1], weight.shape[0])


def _check(x, weight, bias, activation) -> str:
    """Validates the arguments of ``linear``; returns the backend that runs it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: input must be a torch.Tensor, got {type(x).__name__}")
    device, dtype = x.device, x.dtype
    backend = backend_for(x)
    # The common case in a few comparisons (this runs on every call of every layer); anything
    # unusual goes through the full checks below, which name the problem.
    if (isinstance(weight, torch.Tensor) and weight.dtype == dtype and weight.device == device
            and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == dtype and bias.device == device
                                  and bias.dim() == 1 and bias.shape[0] == weight.shape[0]))
            and activation in _TORCH_ACTIVATIONS
            and (dtype in SUPPORTED_DTYPES[backend] if backend in SUPPORTED_DTYPES else x.is_floating_point())):
        return backend
    check_tensor(_OP, "input", x, backend=backend)
    check_tensor(_OP, "weight", weight, backend=backend, dim=2)
    if x.dim() == 0:
        raise ValueError(f"{_OP}: input must have at least 1 dimension (*, in_features), got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_OP}: input of shape {tuple(x.shape)} has {x.shape[-1]} features but weight of shape "
                         f"{tuple(weight.shape)} expects in_features={weight.shape[1]}")
    if bias is not None:
        check_tensor(_OP, "bias", bias, backend=backend, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{_OP}: bias of shape {tuple(bias.shape)} does not match weight of shape "
                             f"{tuple(weight.shape)}: expected ({weight.shape[0]},)")
    check_same(_OP, input=x, weight=weight, bias=bias)
    if activation not in _TORCH_ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return backend


# ---------------------------------------------------------------------------------------------
# The kernels of each backend, on 2-D tensors (contiguous ones for "cpu").

def _cpu_forward(x, weight, bias, activation):
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty(M, N)  # sizes as separate ints: a tuple costs 0.4 us more to parse
    cpp().linear_forward(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                         M, N, K, activation, cpp_dtype(x), num_threads())
    return y


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpu_backward(dy, x, weight, y, activation, need_x, need_weight, need_bias):
    M, K = x.shape
    N = weight.shape[0]
    dy = dy.contiguous()
    dx = x.new_empty(M, K) if need_x else None
    dw = weight.new_empty(N, K) if need_weight else None
    db = weight.new_empty(N) if need_bias else None
    cpp().linear_backward(dy.data_ptr(), _address(y), x.data_ptr(), weight.data_ptr(), _address(dx), _address(dw),
                          _address(db), M, N, K, activation, cpp_dtype(x), num_threads())
    return dx, dw, db


def _forward(x, weight, bias, activation, backend):
    if torch.compiler.is_compiling():
        return torch.ops.kernels.linear_forward(x, weight, bias, activation, backend)
    return _run_forward(x, weight, bias, activation, backend)


def _run_forward(x, weight, bias, activation, backend):
    if backend == "cpu":
        return _cpu_forward(x, weight, bias, activation)
    return triton_op("linear").forward(x, weight, bias, activation)


def _backward(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias):
    if torch.compiler.is_compiling():
        grads = torch.ops.kernels.linear_backward(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias)
        return tuple(g if need else None for g, need in zip(grads, (need_x, need_weight, need_bias)))
    return _run_backward(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias)


def _run_backward(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias):
    if backend == "cpu":
        return _cpu_backward(dy, x, weight, y, activation, need_x, need_weight, need_bias)
    return triton_op("linear").backward(dy, x, weight, y, activation, need_x, need_weight, need_bias)


# The same two calls as custom ops, for torch.compile. Gradients that are not needed come back
# as empty tensors (an op returns tensors only).
@torch.library.custom_op("kernels::linear_forward", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, str activation, str backend) -> Tensor")
def _linear_forward_op(x, weight, bias, activation, backend):
    return _run_forward(x, weight, bias, activation, backend)


@_linear_forward_op.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("kernels::linear_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor weight, Tensor? y, str activation, str backend, "
                                "bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")
def _linear_backward_op(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias):
    grads = _run_backward(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_linear_backward_op.register_fake
def _(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape if need_x else 0), x.new_empty(weight.shape if need_weight else 0),
            x.new_empty(weight.shape[0] if need_bias else 0))


def _linear_grads(ctx, dy):
    x, weight, y = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    dx, dw, db = _backward(dy, x, weight, y, ctx.activation, ctx.backend, need_x, need_weight, need_bias)
    return dx, dw, db, None, None


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend):
        y = _forward(x, weight, bias, activation, backend)
        ctx.activation, ctx.backend = activation, backend
        ctx.save_for_backward(x, weight, None if activation == "none" else y)
        return y

    backward = once_differentiable_backward(_linear_grads)


class FusedLinear(nn.Module):
    """``nn.Sequential(nn.Linear(in_features, out_features, bias), activation)`` as one fused
    layer: the parameters (``weight``, ``bias``), their shapes, default initialisation and
    state_dict keys are nn.Linear's, so state_dicts load into and out of nn.Linear unchanged."""

    __constants__ = ["in_features", "out_features", "activation"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in _TORCH_ACTIVATIONS:
            raise ValueError(f"FusedLinear: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, "
                             f"got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (same random draws, so seeded models match)."""
        nn.Linear.reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")
