"""MNIST and Fashion-MNIST as tensors resident on the training device.

Each split is read once from its IDX files (our own small parser: magic number and sizes are
checked, so a corrupt or truncated file fails with a message naming it), normalised once as the
tutorials' ``ToTensor() + Normalize(0.5, 0.5)`` does, flattened to (N, 784) float32 and moved to
the device. Batches are then index_select's of a per-epoch permutation drawn from a seeded
``torch.Generator``: no DataLoader, no per-sample Python work.

Where the files come from, in order: ``--data-dir`` holding the four IDX files (gzipped or not,
directly or in torchvision's ``<dir>/<MNIST|FashionMNIST>/raw`` layout); Debian's
``dataset-fashion-mnist`` package for fashion-mnist; a torchvision download into ``--data-dir``.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ffnn.errors import FFNNError

DEFAULT_DATA_DIR = "data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

CLASSES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}
# torchvision's dataset class (and folder name) per dataset
TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08  # the only element type MNIST-format files use


class IDXError(FFNNError):
    """An IDX file that is not what its name says (bad magic number, wrong sizes, truncated)."""


def read_idx(path: str | Path) -> torch.Tensor:
    """The uint8 array stored in an IDX file (gzipped when it starts with gzip's magic bytes).

    Layout: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions,
    one big-endian int32 per dimension, then the elements in C order.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise IDXError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path} is not an IDX file: it does not start with the IDX magic number "
                       f"(00 00 <type> <ndim>), got {raw[:4].hex(' ') or 'an empty file'}")
    dtype, ndim = raw[2], raw[3]
    if dtype != IDX_UBYTE:
        raise IDXError(f"{path}: IDX element type 0x{dtype:02x} is not supported (MNIST files hold unsigned bytes, 0x08)")
    if not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise IDXError(f"{path}: bad IDX header ({ndim} dimensions, {len(raw)} bytes in the file)")
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    count = 1
    for d in shape:
        count *= d
    data = memoryview(raw)[4 + 4 * ndim:]
    if min(shape) < 0 or len(data) != count:
        raise IDXError(f"{path}: the header says shape {shape} ({count} bytes of data) but the file holds "
                       f"{len(data)} bytes after the header: the file is truncated or corrupt")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(shape)


def _find_file(directory: Path, name: str) -> Path | None:
    for stem in (name, name.replace("-idx", ".idx")):  # some copies spell it train-images.idx3-ubyte
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def find_idx_dir(dataset: str, data_dir: str | Path) -> Path | None:
    """The directory under ``data_dir`` that holds all four IDX files of ``dataset``, if any."""
    root = Path(data_dir)
    for directory in (root, root / TORCHVISION_CLASS[dataset] / "raw"):
        if all(_find_file(directory, f) for files in SPLIT_FILES.values() for f in files):
            return directory
    return None


def read_split(directory: str | Path, split: str, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, H, W), labels int64 (N,)) of the ``train`` or ``test`` split in ``directory``."""
    directory = Path(directory)
    image_name, label_name = SPLIT_FILES[split]
    image_path, label_path = _find_file(directory, image_name), _find_file(directory, label_name)
    if image_path is None or label_path is None:
        raise FFNNError(f"{directory} has no {image_name}[.gz] / {label_name}[.gz]")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3:
        raise IDXError(f"{image_path}: expected images of shape (N, rows, cols), got shape {tuple(images.shape)}")
    if labels.dim() != 1:
        raise IDXError(f"{label_path}: expected labels of shape (N,), got shape {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise IDXError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) >= num_classes:
        raise IDXError(f"{label_path}: label {int(labels.max())} is out of range for {num_classes} classes")
    return images, labels.long()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], bit for bit what ToTensor() + Normalize((0.5,), (0.5,)) gives."""
    return (images.float() / 255 - 0.5) / 0.5


@dataclass
class Data:
    """Both splits of a dataset on one device: images flattened and normalised, labels int64."""

    name: str
    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    image_shape: tuple[int, int]
    source: str

    @property
    def num_features(self) -> int:
        return self.image_shape[0] * self.image_shape[1]


def _torchvision_download(dataset: str, data_dir: Path) -> None:
    import torchvision.datasets  # slow to import: only when downloading

    for train in (True, False):
        getattr(torchvision.datasets, TORCHVISION_CLASS[dataset])(str(data_dir), train=train, download=True)


def _download(dataset: str, data_dir: Path) -> Path:
    """Download with torchvision into data_dir; the directory holding the IDX files afterwards."""
    try:
        _torchvision_download(dataset, data_dir)
    except Exception as e:  # offline, mirror down, disk full: all mean "no data"
        raise FFNNError(_no_data_message(dataset, data_dir, f"the download failed ({type(e).__name__}: {e})")) from e
    found = find_idx_dir(dataset, data_dir)
    if found is None:
        raise FFNNError(_no_data_message(dataset, data_dir, "the download left no IDX files"))
    return found


def _no_data_message(dataset: str, data_dir: Path, why: str) -> str:
    files = ", ".join(f"{f}[.gz]" for fs in SPLIT_FILES.values() for f in fs)
    hint = (f"no {dataset} data in {data_dir} and {why}. Either run once with internet access to download it, "
            f"or put the four IDX files ({files}) into a directory and pass --data-dir DIR")
    if dataset == "fashion-mnist":
        hint += f" (on Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs them into {DEBIAN_FASHION_MNIST})"
    else:
        hint += (f", or train on Fashion-MNIST instead with --dataset fashion-mnist (on Debian/Ubuntu "
                 f"`apt-get install dataset-fashion-mnist` installs it into {DEBIAN_FASHION_MNIST})")
    return hint


def locate(dataset: str, data_dir: str | Path | None = None, download: bool = True) -> Path:
    """The directory holding the four IDX files of ``dataset``, downloading them if needed and allowed."""
    if dataset not in CLASSES:
        raise FFNNError(f"unknown dataset {dataset!r}: choose mnist or fashion-mnist")
    if data_dir is None:
        if dataset == "fashion-mnist" and find_idx_dir(dataset, DEBIAN_FASHION_MNIST):
            return DEBIAN_FASHION_MNIST
        data_dir = DEFAULT_DATA_DIR
    data_dir = Path(data_dir)
    found = find_idx_dir(dataset, data_dir)
    if found is not None:
        return found
    if not download:
        raise FFNNError(_no_data_message(dataset, data_dir, "downloading is off (--no-download)"))
    return _download(dataset, data_dir)


def load(dataset: str = "mnist", data_dir: str | Path | None = None, device: str | torch.device = "cpu",
         download: bool = True, splits: tuple[str, ...] = ("train", "test")) -> Data:
    """Read, normalise and move to ``device`` the requested splits (others are left empty)."""
    directory = locate(dataset, data_dir, download)
    classes = CLASSES[dataset]
    tensors, shape = {}, None
    for split in ("train", "test"):
        if split in splits:
            images, labels = read_split(directory, split, len(classes))
            if shape is not None and tuple(images.shape[1:]) != shape:
                raise IDXError(f"{directory}: train images are {shape} but test images are {tuple(images.shape[1:])}")
            shape = tuple(images.shape[1:])
            # uint8 crosses to the device (4x fewer bytes than float), then is normalised there
            x = normalize(images.to(device).flatten(1))
            tensors[split] = (x, labels.to(device))
        else:
            tensors[split] = (torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device))
    return Data(dataset, classes, *tensors["train"], *tensors["test"], image_shape=shape, source=str(directory))


def epoch_batches(num_samples: int, batch_size: int, generator: torch.Generator, device: torch.device,
                  shard: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """One epoch of index batches: a permutation drawn on the CPU from ``generator`` (the same
    on every device and every rank), cut into ``num_samples // batch_size`` full batches on
    ``device``, of which each batch keeps columns [lo, hi) of ``shard`` (a rank's part).

    The last partial batch is dropped (like DataLoader's drop_last) so every step has the same
    shape, which a captured CUDA graph needs: 60000 / 64 gives 937 steps."""
    steps = num_samples // batch_size
    perm = torch.randperm(num_samples, generator=generator)[: steps * batch_size].view(steps, batch_size)
    if shard is not None:
        perm = perm[:, shard[0]:shard[1]]
    return perm.to(device).unbind(0)
