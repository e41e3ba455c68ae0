"""Fused training kernels for feed-forward networks: Triton on NVIDIA GPUs, C++ on CPUs.

The tensor's device picks the backend (see kernels._dispatch); every op is an autograd
Function with a functional form and an nn.Module / torch.optim.Optimizer drop-in.
"""
from kernels._dispatch import backend_for

# ops: each line is added by the op's own module
__all__ = ["backend_for"]
