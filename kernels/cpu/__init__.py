"""The CPU backend: one module per op that launches its C++ kernel (csrc/<op>.cpp, built into
kernels._C) on CPU tensors.

Calling convention of every C++ entry point, so that the launchers all read alike:

    _C.<op>_<function>(dtype, tensor addresses..., sizes..., options..., num_threads)

``dtype`` is ``dtype_name(t)`` ("float32" or "float64"), tensors cross as ``data_ptr()``
addresses (0 for an absent one) of contiguous tensors whose shapes the Python layer has checked,
and ``num_threads`` is ``torch.get_num_threads()``, the count PyTorch's own CPU kernels use.
Every entry point releases the GIL.
"""
from __future__ import annotations

from types import ModuleType

import torch

_extension: ModuleType | None = None


def extension() -> ModuleType:
    """The compiled C++ extension kernels._C, with a clear message when it was not built."""
    global _extension
    if _extension is None:
        try:
            from kernels import _C
        except ImportError as e:
            raise RuntimeError(
                "the C++ CPU kernels (kernels._C) are not built or do not load "
                f"({e}). Build them with `pip install -e .` (or `python setup.py build_ext --inplace`) "
                "in the repository root, or run kernels.set_backend('torch') to use plain PyTorch."
            ) from e
        _extension = _C
    return _extension


def dtype_name(t: torch.Tensor) -> str:
    """The dtype argument of the C++ entry points (see dispatch_dtype in csrc/common.h)."""
    return "float64" if t.dtype == torch.float64 else "float32"


def address(t: torch.Tensor | None) -> int:
    """The address a C++ entry point takes for ``t``: 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


# Threads for the C++ kernels: the same count PyTorch's own CPU kernels use. An alias rather than
# a function calling it: every launch reads it, and a Python call costs 0.1-0.3 us.
num_threads = torch.get_num_threads
