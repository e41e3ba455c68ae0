"""Which backend runs an op, and the input checks that every op shares.

Every op has one module per backend, each with the same functions and signatures (``forward``
and ``backward``, or ``step``):

    kernels/triton/<op>.py      Triton kernels and their launchers: CUDA tensors (and CPU tensors
                                under TRITON_INTERPRET=1, how CI tests them without a GPU)
    kernels/cpu/<op>.py         launchers of the C++ kernels in csrc/<op>.cpp (kernels._C)
    kernels/reference/<op>.py   plain PyTorch: the fallback for any other device

``implementation(op, tensor)`` is the one table that picks among them. The tensor's device
decides (CUDA -> "triton", CPU -> "cpu", anything else -> "torch"), and a floating dtype that
the device's kernels do not compute (bfloat16 and float16 on the CPU) goes to "torch", which runs
PyTorch's own ops as they would run without this library; unless a backend is forced:
``KERNELS_BACKEND`` (read once, at import) or ``kernels.set_backend`` / ``kernels.use_backend``
at run time, when a tensor of a dtype that backend lacks is an error.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch

# Backend name -> the package holding its module of each op.
PACKAGES = {"triton": "kernels.triton", "cpu": "kernels.cpu", "torch": "kernels.reference"}
BACKENDS = tuple(PACKAGES)

# Floating dtypes each backend computes in; "torch" takes whatever PyTorch takes. float64 on
# Triton exists for the interpreter's exact tests.
SUPPORTED_DTYPES = {
    "triton": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "cpu": (torch.float32, torch.float64),
}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _parse(name: str | None) -> str | None:
    name = (name or "").strip().lower() or None
    if name is not None and name not in PACKAGES:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name


_forced: str | None = _parse(os.environ.get("KERNELS_BACKEND"))
_chosen: dict[tuple, str] = {}  # (forced, device type, dtype or None) -> backend
_modules: dict[tuple[str, str], ModuleType] = {}  # (op, backend) -> module


def set_backend(name: str | None) -> None:
    """Run every op on backend ``name`` ("triton", "cpu" or "torch") from now on, whatever the
    tensors' device; None goes back to choosing by device. ``KERNELS_BACKEND`` sets the value
    this starts with."""
    global _forced
    _forced = _parse(name)


def get_backend() -> str | None:
    """The backend forced by ``set_backend`` or ``KERNELS_BACKEND``, or None."""
    return _forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """``set_backend(name)`` inside a ``with`` block, restoring the previous choice after it."""
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def backend_for(where: torch.device | torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """The backend that runs an op on ``where``: a tensor (its device and dtype), or a device
    (with the tensors' ``dtype`` when given)."""
    if isinstance(where, torch.Tensor):  # is_cuda/is_cpu cost 40 ns, device.type 300
        key = (_forced, "cuda" if where.is_cuda else "cpu" if where.is_cpu else where.device.type, where.dtype)
    else:
        key = (_forced, torch.device(where).type, dtype)
    backend = _chosen.get(key)
    if backend is None:  # asked on every call: worked out once per (setting, device type, dtype)
        backend = _chosen[key] = _choose(*key)
    return backend


def _choose(forced: str | None, device_type: str, dtype: torch.dtype | None) -> str:
    backend = _choose_for_device(forced, device_type)
    if (forced is None and dtype is not None and dtype.is_floating_point and backend in SUPPORTED_DTYPES
            and dtype not in SUPPORTED_DTYPES[backend]):
        return "torch"
    return backend


def _choose_for_device(forced: str | None, device_type: str) -> str:
    if forced == "cpu" and device_type != "cpu":
        raise ValueError(f"backend 'cpu' runs the C++ kernels on CPU tensors only, got a {device_type} tensor")
    if forced == "triton" and device_type != "cuda" and not triton_interpreting():
        raise ValueError(f"backend 'triton' on a {device_type} tensor needs Triton's interpreter: "
                         "set TRITON_INTERPRET=1 before importing kernels")
    if forced is not None:
        return forced
    if device_type == "cuda" and _triton_available():
        return "triton"
    return "cpu" if device_type == "cpu" else "torch"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def implementation(op: str, where: torch.device | torch.Tensor | str) -> ModuleType:
    """The module of ``op`` ("linear", "cross_entropy", "adam", ...) in the backend that runs it
    on ``where`` (a tensor or device), or in the backend named by ``where`` itself."""
    backend = where if isinstance(where, str) else backend_for(where)
    module = _modules.get((op, backend))
    if module is None:  # imported on first use: importing Triton takes a second
        module = _modules[(op, backend)] = importlib.import_module(f"{PACKAGES[backend]}.{op}")
    return module


# ---------------------------------------------------------------------------------------------
# Input checks. The public entry points validate; the backends and kernels trust their inputs.

def dtype_names(backend: str) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES[backend])


def check_tensor(op: str, name: str, t, *, backend: str | None = None, dim: int | tuple | None = None) -> None:
    """Raise a TypeError/ValueError naming `op` and `name` unless `t` is a floating tensor that
    `backend` supports, with `dim` dimensions (an int, or a tuple of allowed counts)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if backend in SUPPORTED_DTYPES and t.dtype not in SUPPORTED_DTYPES[backend]:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, the {backend} backend supports {dtype_names(backend)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if dim is not None:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{op}: {name} must have {want} dimension(s), got shape {tuple(t.shape)}")


def same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a.device == b.device`` for CPU and CUDA tensors, at a tenth of its cost; False for any
    other pair (callers then take their general path)."""
    return (a.is_cpu and b.is_cpu) or (a.is_cuda and b.is_cuda and a.get_device() == b.get_device())


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
