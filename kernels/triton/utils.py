"""Helpers that every Triton launcher shares: autotuning that also works under the
interpreter, the fp32 dot precision PyTorch would use, the accumulator dtype, and the guard that
launches on the tensors' GPU."""
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
    """``input_precision`` for tl.dot: for fp32, what PyTorch would use for an fp32 matmul on CUDA
    (``tf32`` only where its settings allow TF32, see ``tf32_allowed``); ``ieee`` for every other
    dtype (exact for fp64; bf16/fp16 take the tensor cores either way)."""
    return "tf32" if dtype == torch.float32 and tf32_allowed() else "ieee"


def tf32_allowed() -> bool:
    """PyTorch's rule for a CUDA fp32 matmul, read through whichever API the installed torch has.
    Since torch 2.9 the setting is ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" or
    "ieee"; "none" defers to ``torch.backends.fp32_precision``), which
    ``torch.set_float32_matmul_precision("high"/"medium")`` and the legacy ``allow_tf32 = True``
    also set; reading ``allow_tf32`` there raises once the new API was used, so it is read only on
    an older torch, which has nothing else."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


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
