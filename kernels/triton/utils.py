"""Helpers that every Triton launcher shares: autotuning that also works under the
interpreter, the fp32 dot precision PyTorch would use, and the accumulator dtype."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels._dispatch import triton_interpreting


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` on a GPU. Under ``TRITON_INTERPRET=1`` the autotuner cannot time
    anything ("0 active drivers"), so the first config is bound with ``triton.heuristics``."""
    if not triton_interpreting():
        return triton.autotune(configs=configs, key=key, **kwargs)
    first = configs[0].kwargs
    return triton.heuristics({k: (lambda args, v=v: v) for k, v in first.items()})


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: PyTorch's own choice for an fp32 matmul on CUDA (TF32 only
    when the user allowed it), exact ``ieee`` for fp64, and the native tensor-core path otherwise."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def accumulator(dtype: torch.dtype):
    """float64 accumulates in float64 (a float32 accumulator gives garbage under the
    interpreter); every other dtype accumulates in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


TORCH_TO_TL = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def device_guard(t: torch.Tensor):
    """A context that makes ``t``'s GPU the current one while kernels launch on it: Triton
    launches on the current device, so tensors on cuda:1 with device 0 current would be read
    through the wrong context. It only switches when the devices differ."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
