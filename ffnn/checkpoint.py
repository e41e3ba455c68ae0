"""Checkpoints: written atomically with a checksum, read safely (``weights_only``), turned back
into a model.

A training checkpoint holds the model's state_dict, its architecture, the optimizer's
state_dict, where training stands (``epoch``, ``step`` within it, the shuffling generator's
state at the start of that epoch and the epoch's partial loss sum), PyTorch's RNG state, the
metrics so far and the command-line arguments. On disk it is a ``torch.save`` file of
``{"format": "ffnn-checkpoint", "version": 2, "sha256": ..., "payload": uint8 tensor}``, the
payload being the ``torch.save`` bytes of that dict: ``torch.load`` reads it, and ``load``
checks the payload against its SHA-256 before trusting a byte of it. A bare state_dict (what
``torch.save(model.state_dict(), path)`` writes in the tutorials) is accepted for evaluation and
prediction too.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import secrets
from pathlib import Path

import torch

from ffnn.errors import FFNNError
from ffnn.model import build, sizes_from_state_dict

FORMAT = "ffnn-checkpoint"
VERSION = 2
ZIP_MAGIC = b"PK\x03\x04"  # what every torch.save file (a zip archive) starts with


def _temporaries(path: Path) -> str:
    """The glob of the temporary files ``save`` writes ``path`` through."""
    return f".{path.name}.*.tmp"


def save(payload: dict, path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same directory, flushed
    to disk, then renamed over ``path``, so an interrupted save never leaves half a checkpoint.
    The file is created with the process's umask, like every other output of a run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    envelope = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                "payload": torch.frombuffer(body, dtype=torch.uint8)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(envelope, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_partial_saves(path: str | Path) -> list[Path]:
    """Delete the temporary files that saves of ``path`` left behind when killed mid-write
    (call it only where no other process is saving ``path``); returns what was removed."""
    path = Path(path)
    stale = sorted(path.parent.glob(_temporaries(path)))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _damaged(path: Path, why: str) -> FFNNError:
    return FFNNError(f"{path} is damaged ({why}): it cannot be used; resume from another checkpoint or train anew")


def _read(path: Path, data: bytes) -> object:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        if not data:
            raise _damaged(path, "the file is empty") from e
        if not data.startswith(ZIP_MAGIC):
            raise FFNNError(f"{path} is not a checkpoint of ffnn.train nor a PyTorch state_dict "
                            f"(it is not a file torch.save wrote)") from e
        if isinstance(e, pickle.UnpicklingError):  # what weights_only raises for anything but tensors and plain data
            raise FFNNError(f"{path} is not a checkpoint of ffnn.train nor a state_dict (it holds objects that "
                            "are not loaded for safety), or it is damaged") from e
        raise _damaged(path, "PyTorch cannot read it: it is truncated or was changed after it was written") from e


def load(path: str | Path) -> dict:
    """A checkpoint as a dict with at least ``model`` and ``arch``, tensors on the CPU, or an
    FFNNError naming the file when it is missing, damaged or something else."""
    path = Path(path)
    if not path.is_file():
        raise FFNNError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FFNNError(f"cannot read checkpoint {path}: {e.strerror}") from e
    obj = _read(path, data)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("version") == 1:  # before checksums: the payload itself
            return obj
        payload = obj.get("payload")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise _damaged(path, "it has no payload")
        body = payload.numpy().tobytes()
        if hashlib.sha256(body).hexdigest() != obj.get("sha256"):
            raise _damaged(path, "its contents do not match the checksum stored with them")
        ckpt = _read(path, body)
        if isinstance(ckpt, dict) and "model" in ckpt and "arch" in ckpt:
            return ckpt
        raise _damaged(path, "its payload is not a training checkpoint")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # a bare state_dict, e.g. the tutorial's torch.save(model.state_dict(), "model.pth")
        return {"format": FORMAT, "model": obj, "arch": {"sizes": list(sizes_from_state_dict(obj)), "activation": "relu"}}
    raise FFNNError(f"{path} is a PyTorch file but neither a checkpoint of ffnn.train nor a model state_dict")


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
