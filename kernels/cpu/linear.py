"""Linear + bias + activation on CPU tensors: launchers of csrc/linear.cpp.

Same functions and signatures as kernels/triton/linear.py and kernels/reference/linear.py; the
C++ kernels take contiguous 2-D tensors, so the inputs are made contiguous here.
"""
from __future__ import annotations

import torch

from kernels.cpu import address, dtype_name, extension, num_threads


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y = act(x W^T + b) for x (M, K), weight (N, K), bias (N,) or None."""
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = x.new_empty(M, N)  # sizes as separate ints: a tuple costs 0.4 us more to parse
    extension().linear_forward(dtype_name(x), x.data_ptr(), weight.data_ptr(), address(bias), y.data_ptr(),
                               M, N, K, activation, num_threads())
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor | None, activation: str,
             need_x: bool, need_weight: bool, need_bias: bool):
    """(dx, dW, db) of y = act(x W^T + b), each None unless needed; y is None for "none"."""
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    y = None if y is None else y.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    dx = x.new_empty(M, K) if need_x else None
    dw = weight.new_empty(N, K) if need_weight else None
    db = weight.new_empty(N) if need_bias else None
    extension().linear_backward(dtype_name(x), dy.data_ptr(), address(y), x.data_ptr(), weight.data_ptr(),
                                address(dx), address(dw), address(db), M, N, K, activation, num_threads())
    return dx, dw, db
