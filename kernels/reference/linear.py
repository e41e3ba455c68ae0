"""Linear + bias + activation in plain PyTorch, with the functions and signatures of
kernels/triton/linear.py and kernels/cpu/linear.py (see kernels/ops/linear.py for the math).

``backward`` is written in differentiable ops, so it also serves as the backward of every
backend when a graph of the gradient is being built (double backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": torch.relu, "none": lambda z: z, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def activation_grad(dy: torch.Tensor, y: torch.Tensor | None, activation: str) -> torch.Tensor:
    """dz = dy * act'(z), written with the activation's output y."""
    if activation == "relu":  # as torch's threshold_backward: a NaN output passes its gradient
        return torch.where(y <= 0, 0, dy)
    if activation == "sigmoid":
        return dy * y * (1 - y)
    if activation == "tanh":
        return dy * (1 - y * y)
    return dy


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor | None, activation: str,
             need_x: bool, need_weight: bool, need_bias: bool):
    dz = activation_grad(dy, y, activation)
    dx = dz @ weight if need_x else None
    dw = dz.t() @ x if need_weight else None
    db = dz.sum(0) if need_bias else None
    return dx, dw, db
