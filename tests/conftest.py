"""Shared test fixtures.

Every op is tested on each of its backends against PyTorch's own modules:
* ``cpu``: the C++ kernels on CPU tensors;
* ``triton``: the Triton kernels, compiled on CUDA tensors when a GPU is present, otherwise run
  by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before Triton compiles
  the kernels, hence here, before anything imports kernels.triton).
"""
import os
from dataclasses import dataclass

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@dataclass(frozen=True)
class Backend:
    name: str  # the kernels.set_backend name
    device: torch.device

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device.type == "cpu"

    def __str__(self):
        return f"{self.name}-{self.device.type}"


def _backends():
    yield Backend("cpu", torch.device("cpu"))
    yield Backend("triton", torch.device("cuda" if HAS_CUDA else "cpu"))


@pytest.fixture(autouse=True)
def _restore_backend():
    """A test may force a backend with kernels.set_backend; the next test starts unforced."""
    import kernels

    yield
    kernels.set_backend(None)


@pytest.fixture(params=list(_backends()), ids=str)
def backend(request) -> Backend:
    """Runs the test once per backend, forced with kernels.set_backend."""
    import kernels

    kernels.set_backend(request.param.name)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cpu_isas():
    """The SIMD variants of the C++ kernels this CPU can run (each is compiled into kernels._C)."""
    from kernels import _C

    order = ("portable", "avx2", "avx512")
    return list(order[: order.index(_C.isa()) + 1])


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Runs the test once per SIMD variant of the C++ kernels (backend "cpu"), restoring the
    best one afterwards: CI's AVX-512 machine would otherwise never run the others."""
    import kernels
    from kernels import _C

    best = _C.isa()
    kernels.set_backend("cpu")
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(best)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-thread")
def threads(request):
    """Runs the test with PyTorch's thread count (the C++ kernels' too) at 1, then 2, restoring
    it afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
