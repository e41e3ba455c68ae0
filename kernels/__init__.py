"""Fused training kernels for feed-forward networks: Triton on NVIDIA GPUs, C++ on CPUs.

The tensor's device picks the backend (see kernels._dispatch); every op is an autograd
Function with a functional form and an nn.Module / torch.optim.Optimizer drop-in.
"""
from importlib import metadata as _metadata


def _refuse_namesake() -> None:
    """PyPI's unrelated ``kernels`` distribution installs a top-level package of this same name:
    with both installed, one overwrites or shadows the other and imports half-work. Say so."""
    try:
        other = _metadata.distribution("kernels")
    except _metadata.PackageNotFoundError:
        return
    if "feed-forward" in (other.metadata["Summary"] or ""):  # this project, installed under its old name
        return
    raise ImportError(
        f"the unrelated PyPI package 'kernels' {other.version} is installed beside ffnn-fused-kernels, "
        "and both install a top-level package named 'kernels'. Remove it and reinstall this one: "
        "`pip uninstall -y kernels && pip install --force-reinstall --no-deps -e .` (from this repository)"
    )


_refuse_namesake()

from kernels._dispatch import backend_for, get_backend, set_backend, use_backend  # noqa: E402
from kernels.ops.adam import FusedAdam, FusedAdamW  # noqa: E402
from kernels.ops.cross_entropy import FusedCrossEntropyLoss, cross_entropy  # noqa: E402
from kernels.ops.linear import ACTIVATIONS, FusedLinear, linear  # noqa: E402
from kernels.ops.mlp import MLPStep  # noqa: E402
from kernels.ops.sgd import FusedSGD  # noqa: E402
from kernels.convert import fuse, fuse_optimizer  # noqa: E402

try:
    __version__ = _metadata.version("ffnn-fused-kernels")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ACTIVATIONS",
    "backend_for",
    "get_backend",
    "set_backend",
    "use_backend",
    "linear",
    "FusedLinear",
    "MLPStep",
    "cross_entropy",
    "FusedCrossEntropyLoss",
    "FusedAdam",
    "FusedAdamW",
    "FusedSGD",
    "fuse",
    "fuse_optimizer",
]
