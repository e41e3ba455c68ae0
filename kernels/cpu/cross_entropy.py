"""Softmax cross-entropy on CPU tensors: launchers of csrc/cross_entropy.cpp.

Same functions and signatures as kernels/triton/cross_entropy.py and
kernels/reference/cross_entropy.py (see kernels/ops/cross_entropy.py for the math).
"""
from __future__ import annotations

import torch

from kernels.cpu import address, dtype_name, extension, num_threads
from kernels.reference.cross_entropy import bad_target_error


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
            label_smoothing: float, reduction: str, grad: torch.Tensor | None) -> torch.Tensor:
    """The loss of contiguous (N, C) logits for ``reduction`` ("none", "sum" or "mean"), in the
    logits' dtype, given a contiguous (N,) integer target and a contiguous (C,) weight or None;
    writes dloss/dlogits into the contiguous ``grad`` when given (it may be ``logits`` itself).
    Raises ValueError naming the first target neither ignore_index nor in [0, C)."""
    N, C = logits.shape
    if target.dtype != torch.int64:  # the kernel reads int64 (a contiguous tensor stays contiguous)
        target = target.to(torch.int64)
    loss = logits.new_empty(N) if reduction == "none" else logits.new_empty(size=())  # the fastest spellings
    bad_row = extension().cross_entropy_forward(dtype_name(logits), logits.data_ptr(), target.data_ptr(),
                                                address(weight), loss.data_ptr(), address(grad), N, C, ignore_index,
                                                label_smoothing, reduction, num_threads())
    if bad_row >= 0:
        raise bad_target_error(target, bad_row, C, ignore_index)
    return loss


def backward(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, C) *= grad_output (a scalar, or one value per row with any stride), in place;
    rows whose factor is 1 are left as they are."""
    N, C = grad.shape
    extension().cross_entropy_backward(dtype_name(grad), grad.data_ptr(), grad_output.data_ptr(),
                                       grad_output.stride(0) if grad_output.dim() else 0, N, C, num_threads())
