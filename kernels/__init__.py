"""Fused training kernels for feed-forward networks: Triton on NVIDIA GPUs, C++ on CPUs.

The tensor's device picks the backend (see kernels._dispatch); every op is an autograd
Function with a functional form and an nn.Module / torch.optim.Optimizer drop-in.
"""
from kernels._dispatch import backend_for
from kernels.adam import FusedAdam, FusedAdamW
from kernels.cross_entropy import FusedCrossEntropyLoss, cross_entropy
from kernels.linear import FusedLinear, linear

__all__ = [
    "backend_for",
    "linear",
    "FusedLinear",
    "cross_entropy",
    "FusedCrossEntropyLoss",
    "FusedAdam",
    "FusedAdamW",
]
