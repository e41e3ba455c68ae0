"""Checkpoints: written atomically, read safely (``weights_only``), turned back into a model.

A training checkpoint is a dict with ``format: "ffnn-checkpoint"``, the model's state_dict, its
architecture, the optimizer's state_dict, where training stands (``epoch``, ``step`` within it,
the shuffling generator's state at the start of that epoch and the epoch's partial loss sum),
PyTorch's RNG state, the metrics so far and the command-line arguments. A bare state_dict (what
``torch.save(model.state_dict(), path)`` writes in the tutorials) is accepted for evaluation and
prediction too.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ffnn.errors import FFNNError
from ffnn.model import build, sizes_from_state_dict

FORMAT = "ffnn-checkpoint"
VERSION = 1


def save(payload: dict, path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same directory, flushed
    to disk, then renamed over ``path``, so an interrupted save never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> dict:
    """A checkpoint as a dict with at least ``model`` and ``arch``, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FFNNError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FFNNError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # a bare state_dict, e.g. the tutorial's torch.save(model.state_dict(), "model.pth")
        return {"format": FORMAT, "model": obj, "arch": {"sizes": list(sizes_from_state_dict(obj)), "activation": "relu"}}
    raise FFNNError(f"{path} is neither an ffnn checkpoint nor a model state_dict")


def check_architecture(state: dict, sizes: tuple[int, ...], what: str = "the model") -> None:
    """Raise an FFNNError naming both shapes unless ``state`` is the state_dict of an MLP of ``sizes``."""
    found = sizes_from_state_dict(state)
    if found != tuple(sizes):
        raise FFNNError(f"the checkpoint holds an MLP of sizes {'-'.join(map(str, found))} but {what} is "
                        f"{'-'.join(map(str, sizes))}: it is a checkpoint of another architecture")


def model_from(ckpt: dict, impl: str, device: torch.device, num_features: int | None = None,
               num_classes: int | None = None) -> torch.nn.Module:
    """The checkpoint's model for ``impl`` on ``device``; checks it fits the data when told its
    input size and class count."""
    state = ckpt["model"]
    sizes = sizes_from_state_dict(state)
    if num_features is not None and sizes[0] != num_features:
        raise FFNNError(f"the checkpoint's model takes {sizes[0]} inputs but the images have {num_features} pixels: "
                        "it is a checkpoint of another architecture")
    if num_classes is not None and sizes[-1] != num_classes:
        raise FFNNError(f"the checkpoint's model has {sizes[-1]} outputs but the dataset has {num_classes} classes: "
                        "it is a checkpoint of another architecture (or of another --dataset)")
    model = build(impl, sizes, ckpt["arch"].get("activation", "relu"), device=device)
    model.load_state_dict(state)
    return model.eval()
