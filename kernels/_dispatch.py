"""Backend choice, the input checks and the autograd plumbing that every op shares.

The device of the input picks the backend: CUDA tensors go to the Triton kernels, CPU
tensors to the C++ kernels in ``kernels._C``. ``KERNELS_BACKEND`` overrides the choice:

* ``triton``: the Triton kernels, also on CPU tensors when ``TRITON_INTERPRET=1`` was set
  before ``kernels`` was imported (how CI tests the Triton code without a GPU);
* ``cpu``: the C++ kernels (CPU tensors only);
* ``torch``: plain PyTorch, the tests' oracle and the fallback for any other device.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

BACKENDS = ("triton", "cpu", "torch")

# Floating dtypes each backend computes in; "torch" takes whatever PyTorch takes.
SUPPORTED_DTYPES = {
    "triton": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cpu": (torch.float32, torch.float64),
}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(where: torch.device | torch.Tensor) -> str:
    """The backend that runs an op on ``where``: a tensor, or the device its tensors live on."""
    if isinstance(where, torch.Tensor):  # is_cuda/is_cpu cost 40 ns, device.type 300
        kind = "cuda" if where.is_cuda else "cpu" if where.is_cpu else where.device.type
    else:
        kind = where.type
    key = (_environ.get(_BACKEND_KEY) if _environ is not None else os.environ.get("KERNELS_BACKEND"), kind)
    backend = _chosen.get(key)
    if backend is None:  # every op asks on every call: the answer is worked out once per setting
        backend = _chosen[key] = _choose(os.environ.get("KERNELS_BACKEND", ""), kind)
    return backend


_chosen: dict[tuple, str] = {}

# KERNELS_BACKEND is read on every call, so that setting it at run time takes effect. Through
# os.environ.get that costs 0.6 us (key encoding, decoding and the Mapping machinery), a tenth of
# a small layer's whole call. CPython's os.environ keeps its encoded entries in a plain dict,
# updated by every write through os.environ, which answers in 30 ns; the raw entry is the cache
# key, so it is decoded only when it changes.
_environ = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey("KERNELS_BACKEND") if _environ is not None else None


def _choose(forced: str, device_type: str) -> str:
    forced = forced.strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"KERNELS_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "cpu" and device_type != "cpu":
            raise ValueError(f"KERNELS_BACKEND=cpu runs the C++ kernels on CPU tensors only, got a {device_type} tensor")
        if forced == "triton" and device_type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"KERNELS_BACKEND=triton on a {device_type} tensor needs Triton's interpreter: "
                "set TRITON_INTERPRET=1 before importing kernels"
            )
        return forced
    if device_type == "cuda" and _triton_available():
        return "triton"
    if device_type == "cpu":
        return "cpu"
    return "torch"


_triton_ok: bool | None = None


def _triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


def triton_op(name: str) -> ModuleType:
    """The module kernels.triton.<name>, imported on first use (importing Triton is slow)."""
    return importlib.import_module(f"kernels.triton.{name}")


_cpp: ModuleType | None = None


def cpp() -> ModuleType:
    """The compiled C++ extension, with a clear message when it was not built."""
    global _cpp
    if _cpp is None:
        try:
            from kernels import _C
        except ImportError as e:
            raise RuntimeError(
                "the C++ CPU kernels (kernels._C) are not built or do not load "
                f"({e}). Build them with `pip install -e .` (or `python setup.py build_ext --inplace`) "
                "in the repository root, or set KERNELS_BACKEND=torch to use plain PyTorch."
            ) from e
        _cpp = _C
    return _cpp


def cpp_dtype(t: torch.Tensor) -> str:
    """The dtype name the C++ entry points take (see dispatch_dtype in csrc/common.h)."""
    return "float64" if t.dtype == torch.float64 else "float32"


def num_threads() -> int:
    """Threads for the C++ kernels: the same count PyTorch's own CPU kernels use."""
    return torch.get_num_threads()


def check_tensor(op: str, name: str, t, *, backend: str | None = None, dim: int | tuple | None = None) -> None:
    """Raise a TypeError/ValueError naming `op` and `name` unless `t` is a floating tensor that
    `backend` supports, with `dim` dimensions (an int, or a tuple of allowed counts)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if backend in SUPPORTED_DTYPES and t.dtype not in SUPPORTED_DTYPES[backend]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES[backend])
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, the {backend} backend supports {allowed}")
    if not t.is_floating_point() and backend == "torch":
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{op}: {name} must have {want} dimension(s), got shape {tuple(t.shape)}")


def check_same(op: str, **tensors) -> None:
    """Raise unless all the given tensors (None entries skipped) share one device and dtype."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    n0, t0 = named[0]
    for n, t in named[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {n0} is on {t0.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {n} has dtype {t.dtype} but {n0} has dtype {t0.dtype}")


def once_differentiable_backward(grads):
    """The ``backward`` of an autograd.Function whose gradient ``grads(ctx, grad_output)`` cannot
    be differentiated again: under create_graph=True (grad mode on during backward) it is wrapped
    in torch's once_differentiable, which then fails a second differentiation with an error. The
    wrapper costs a few microseconds per call, so a plain backward skips it."""
    guarded = once_differentiable(grads)

    def backward(ctx, grad_output):
        return guarded(ctx, grad_output) if torch.is_grad_enabled() else grads(ctx, grad_output)

    return staticmethod(backward)
