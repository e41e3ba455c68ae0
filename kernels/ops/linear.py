"""Fused Linear + bias + activation: ``kernels.linear`` and ``kernels.FusedLinear``.

``linear(x, weight, bias, activation)`` is ``act(F.linear(x, weight, bias))`` for x of shape
(*, in_features), with activation "relu", "none", "sigmoid" or "tanh"::

    forward    y  = act(x W^T + b)           one GEMM kernel, bias and activation in its epilogue
    backward   dz = dy * act'(y)             relu: y > 0 or NaN, sigmoid: y (1 - y), tanh: 1 - y^2
               dx = dz W,  dW = dz^T x,  db = sum of dz over the batch

The forward saves only its output y (nothing for "none"): every act' above is a function of y.
The backward forms dz while loading the GEMM operands, sums db inside the dW kernel, and skips
the GEMMs of inputs that need no gradient. Each backend's module (kernels/{triton,cpu,reference}/
linear.py) has the same ``forward`` and ``backward``; the reference's backward, written in
differentiable PyTorch ops, runs when a graph of the gradient itself is being built
(``create_graph=True``: gradient penalties, Hessian-vector products).

Under ``torch.compile`` the autograd Function calls its backend through the custom ops
``torch.ops.kernels.linear_forward`` / ``linear_backward`` (with fake implementations), so a
compiled model traces through the layer without a graph break; eager calls launch directly.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels._dispatch import (SUPPORTED_DTYPES, backend_for, check_same, check_tensor, get_backend, implementation,
                               same_device)
from kernels.reference import linear as reference

OP = "linear"
ACTIVATIONS = tuple(reference.ACTIVATIONS)
# Multiply-adds below which a CPU layer runs PyTorch's own ops, unless a backend is forced
# (set_backend / KERNELS_BACKEND): there the Python of a call through autograd.Function and back
# (about 10 us a layer) costs more than any kernel can save, as in the toy tutorial networks
# (1-2-1 on one sample, 3-5-1 on 30 rows). The MNIST layers are 10x to 1,600x above it.
SMALL_CPU_WORK = 1 << 12


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "relu") -> torch.Tensor:
    """``act(x @ weight.T + bias)``, fused, with the shapes of ``F.linear``: x (*, in_features),
    weight (out_features, in_features), bias (out_features,) or None; returns (*, out_features).

    Backends: Triton on CUDA (float32, bfloat16, float16; float64 too, accumulated in float64 on
    untuned tiles), C++ on CPU (float32, float64; PyTorch's own ops below SMALL_CPU_WORK
    multiply-adds unless a backend is forced), PyTorch's own ops for anything else (other devices,
    bfloat16/float16 on the CPU; see ``kernels._dispatch``), on autograd's own nodes.
    Raises TypeError/ValueError naming the offending shapes, dtypes, devices or activation.
    """
    if _small_on_cpu(x, weight, bias, activation):
        try:
            return reference.forward(x, weight, bias, activation)  # PyTorch's ops on autograd's own nodes
        except RuntimeError:  # F.linear refused the arguments: say what is wrong as the other paths do
            _check_each(x, weight, bias, activation)
            raise
    backend = _check(x, weight, bias, activation)
    if backend == "torch":
        return reference.forward(x, weight, bias, activation)
    two_d = x.dim() == 2
    x2d = x if two_d else x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = LinearFunction.apply(x2d, weight, bias, activation, backend)
    else:  # nothing to differentiate: skip autograd's bookkeeping (2.5 us a call)
        y = _forward(x2d, weight, bias, activation, backend)
    return y if two_d else y.reshape(*x.shape[:-1], weight.shape[0])


def _small_on_cpu(x, weight, bias, activation) -> bool:
    """Whether the call goes to PyTorch's own ops as a layer below SMALL_CPU_WORK on the CPU,
    checked with the least Python a call can take (a tutorial's toy network is nothing but such
    calls, and each check costs 60-140 ns): what ``F.linear`` lets through is checked here (an
    integer input, a weight of other than 2 dimensions or on another device, a bias that would
    broadcast); the rest (dtypes that differ, shapes that do not fit) ``F.linear`` refuses itself."""
    return (isinstance(x, torch.Tensor) and x.numel() < SMALL_CPU_WORK  # rules most layers out at once
            and isinstance(weight, torch.Tensor) and x.is_cpu and weight.is_cpu
            and weight.dim() == 2 and x.numel() * weight.shape[0] < SMALL_CPU_WORK and get_backend() is None
            and x.is_floating_point() and activation in reference.ACTIVATIONS
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.is_cpu and bias.dim() == 1
                                  and bias.shape[0] == weight.shape[0])))


def _check(x, weight, bias, activation) -> str:
    """Validates the arguments of ``linear``; returns the backend that runs it. The common case
    (CPU or one CUDA device, one supported dtype, matching shapes) is recognised in one
    expression; anything else goes through the checks one by one, which name what is wrong."""
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor)):
        backend = backend_for(x)
        # Each attribute read once (60-110 ns apiece), dtypes compared by identity (they are singletons).
        dtype, x_shape, w_shape = x.dtype, x.shape, weight.shape
        if (backend in SUPPORTED_DTYPES and dtype in SUPPORTED_DTYPES[backend] and weight.dtype is dtype
                and len(w_shape) == 2 and len(x_shape) >= 1 and x_shape[-1] == w_shape[1] and same_device(x, weight)
                and activation in reference.ACTIVATIONS
                and (bias is None or (bias.dtype is dtype and len(b_shape := bias.shape) == 1
                                      and b_shape[0] == w_shape[0] and same_device(x, bias)))):
            return backend
    return _check_each(x, weight, bias, activation)


def _check_each(x, weight, bias, activation) -> str:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: input must be a torch.Tensor, got {type(x).__name__}")
    backend = backend_for(x)
    check_tensor(OP, "input", x, backend=backend)
    check_tensor(OP, "weight", weight, backend=backend, dim=2)
    if x.dim() == 0:
        raise ValueError(f"{OP}: input must have at least 1 dimension (*, in_features), got a scalar")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: input of shape {tuple(x.shape)} has {x.shape[-1]} features but weight of shape "
                         f"{tuple(weight.shape)} expects in_features={weight.shape[1]}")
    if bias is not None:
        check_tensor(OP, "bias", bias, backend=backend, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: bias of shape {tuple(bias.shape)} does not match weight of shape "
                             f"{tuple(weight.shape)}: expected ({weight.shape[0]},)")
    check_same(OP, input=x, weight=weight, bias=bias)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return backend


def _forward(x, weight, bias, activation, backend):
    if torch.compiler.is_compiling():
        return torch.ops.kernels.linear_forward(x, weight, bias, activation, backend)
    return implementation(OP, backend).forward(x, weight, bias, activation)


class LinearFunction(torch.autograd.Function):
    """y = act(x W^T + b) for 2-D x on one backend; the backward calls the same backend."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend):
        y = _forward(x, weight, bias, activation, backend)
        ctx.activation, ctx.backend = activation, backend
        ctx.save_for_backward(x, weight, None if activation == "none" else y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable itself
            grads = reference.backward(dy, x, weight, y, ctx.activation, *needs)
        elif torch.compiler.is_compiling():
            grads = torch.ops.kernels.linear_backward(dy, x, weight, y, ctx.activation, ctx.backend, *needs)
            grads = tuple(g if need else None for g, need in zip(grads, needs))
        else:
            grads = implementation(OP, ctx.backend).backward(dy, x, weight, y, ctx.activation, *needs)
        return *grads, None, None


# The backend calls as custom ops, for torch.compile. An op returns tensors only, so gradients
# that are not needed come back as empty tensors.
@torch.library.custom_op("kernels::linear_forward", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor? bias, str activation, str backend) -> Tensor")
def _linear_forward_op(x, weight, bias, activation, backend):
    return implementation(OP, backend).forward(x, weight, bias, activation)


@_linear_forward_op.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("kernels::linear_backward", mutates_args=(),
                         schema="(Tensor dy, Tensor x, Tensor weight, Tensor? y, str activation, str backend, "
                                "bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")
def _linear_backward_op(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias):
    grads = implementation(OP, backend).backward(dy, x, weight, y, activation, need_x, need_weight, need_bias)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_linear_backward_op.register_fake
def _(dy, x, weight, y, activation, backend, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape if need_x else 0), x.new_empty(weight.shape if need_weight else 0),
            x.new_empty(weight.shape[0] if need_bias else 0))


class FusedLinear(nn.Module):
    """``nn.Sequential(nn.Linear(in_features, out_features, bias), activation)`` as one fused
    layer: the parameters (``weight``, ``bias``), their shapes, default initialisation and
    state_dict keys are nn.Linear's, so state_dicts load into and out of nn.Linear unchanged."""

    __constants__ = ["in_features", "out_features", "activation"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None) -> None:
        super().__init__()
        if activation not in reference.ACTIVATIONS:
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
