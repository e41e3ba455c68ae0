"""MNIST and Fashion-MNIST as tensors resident on the training device.

Each split is read once from its IDX files (our own small parser: magic number and sizes are
checked, so a corrupt or truncated file fails with a message naming it), normalised once
(``--normalize``: by default as the tutorials' ``ToTensor() + Normalize(0.5, 0.5)`` does),
flattened to (N, 784) float32 and moved to the device. Batches are then index_select's of a
per-epoch permutation drawn from a seeded ``torch.Generator``: no DataLoader, no per-sample
Python work.

Where the files come from, in order: ``--data-dir`` holding the IDX files (gzipped or not,
directly or in torchvision's ``<dir>/<MNIST|FashionMNIST>/raw`` layout); Debian's
``dataset-fashion-mnist`` package for fashion-mnist; a download from torchvision's mirrors of
the files a command needs, into a temporary directory that is moved into ``--data-dir`` only
once every file has arrived (a failed download leaves nothing behind, and nothing is ever
written under a system dataset directory).
"""
from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ffnn.errors import FFNNError

DEFAULT_DATA_DIR = "data"
SYSTEM_DATASETS = Path("/usr/share/datasets")  # packages' data: read, never written
DEBIAN_FASHION_MNIST = SYSTEM_DATASETS / "fashion-mnist"

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
# --normalize: how uint8 pixels become the model's inputs, with the range 0..255 maps onto
NORMALIZATIONS = {
    "none": (0.0, 255.0),  # the raw pixel values, as floats
    "unit": (0.0, 1.0),  # ToTensor(): pixel / 255
    "tutorial": (-1.0, 1.0),  # ToTensor() + Normalize((0.5,), (0.5,)): (pixel / 255 - 0.5) / 0.5
}
DEFAULT_NORMALIZATION = "tutorial"


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


def _split_files(splits: tuple[str, ...]) -> list[str]:
    return [f for split in splits for f in SPLIT_FILES[split]]


def _search_dirs(dataset: str, data_dir: str | Path) -> tuple[Path, Path]:
    root = Path(data_dir)
    return root, root / TORCHVISION_CLASS[dataset] / "raw"


def find_idx_dir(dataset: str, data_dir: str | Path, splits: tuple[str, ...] = tuple(SPLIT_FILES)) -> Path | None:
    """The directory under ``data_dir`` that holds the IDX files of ``splits`` of ``dataset``, if any."""
    for directory in _search_dirs(dataset, data_dir):
        if all(_find_file(directory, f) for f in _split_files(splits)):
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


def normalize(images: torch.Tensor, how: str = DEFAULT_NORMALIZATION) -> torch.Tensor:
    """uint8 pixels -> float32 as ``NORMALIZATIONS[how]`` says; "unit" and "tutorial" are bit for
    bit what ToTensor() and ToTensor() + Normalize((0.5,), (0.5,)) give."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {how!r}")
    x = images.float()
    if how == "none":
        return x
    x = x / 255
    return x if how == "unit" else (x - 0.5) / 0.5


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


def _torchvision_download(dataset: str, directory: Path, files: list[str]) -> None:
    """Fetch ``files`` (gzipped, checked against torchvision's MD5s) from torchvision's mirrors of
    ``dataset`` into ``directory``; the error of the last mirror tried when one file fails on all."""
    import torchvision.datasets  # slow to import: only when downloading
    from torchvision.datasets.utils import download_and_extract_archive

    source = getattr(torchvision.datasets, TORCHVISION_CLASS[dataset])
    md5 = {name.removesuffix(".gz"): checksum for name, checksum in source.resources}
    for name in files:
        for i, mirror in enumerate(source.mirrors):
            try:
                download_and_extract_archive(f"{mirror}{name}.gz", download_root=str(directory),
                                             filename=f"{name}.gz", md5=md5[name])
                break
            except Exception:
                if i == len(source.mirrors) - 1:
                    raise


def _first_line(error: BaseException) -> str:
    """The gist of an error in one line (torchvision's download errors run over several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:160] if lines else 'no message'}"


def _download(dataset: str, data_dir: Path, splits: tuple[str, ...], searched: list[Path]) -> Path:
    """Download the files of ``splits`` into ``data_dir/<Dataset>/raw``; returns that directory.

    They are fetched into a temporary directory first and moved into place only once all have
    arrived, so a failed download creates no directory and leaves no partial files."""
    if data_dir.resolve().is_relative_to(SYSTEM_DATASETS):
        raise FFNNError(_no_data_message(dataset, searched, splits, f"nothing is downloaded into {SYSTEM_DATASETS}, "
                                         "which belongs to the system's packages"))
    raw = _search_dirs(dataset, data_dir)[1]
    with tempfile.TemporaryDirectory(prefix="ffnn-download-") as tmp:
        try:
            _torchvision_download(dataset, Path(tmp), _split_files(splits))
        except Exception as e:  # offline, mirror down, disk full: all mean "no data"
            raise FFNNError(_no_data_message(dataset, searched, splits,
                                             f"the download failed ({_first_line(e)})")) from e
        raw.mkdir(parents=True, exist_ok=True)
        for name in _split_files(splits):
            shutil.move(Path(tmp) / name, raw / name)  # the extracted files; the .gz copies go with tmp
    return raw


def _no_data_message(dataset: str, searched: list[Path], splits: tuple[str, ...], why: str) -> str:
    """One message: what was looked for, where, why it was not fetched, and how to get it."""
    apt = "`sudo apt-get install -y dataset-fashion-mnist`"
    online = f"by running once with internet access (it is downloaded into --data-dir, default ./{DEFAULT_DATA_DIR})"
    own = "or put the IDX files into a directory and pass --data-dir DIR"
    if dataset == "fashion-mnist":
        how = f"Get it with {apt} (Debian/Ubuntu), {online}, {own}"
    else:
        how = (f"Get it {online}, {own}; offline on Debian/Ubuntu, {apt} and --dataset fashion-mnist "
               "train on Fashion-MNIST instead")
    return (f"no {dataset} data: looked for {', '.join(f + '[.gz]' for f in _split_files(splits))} "
            f"in {', '.join(map(str, searched))}, and {why}. {how}.")


def locate(dataset: str, data_dir: str | Path | None = None, download: bool = True,
           splits: tuple[str, ...] = tuple(SPLIT_FILES)) -> Path:
    """The directory holding the IDX files of ``splits`` of ``dataset``, downloading them if
    needed and allowed."""
    if dataset not in CLASSES:
        raise FFNNError(f"unknown dataset {dataset!r}: choose mnist or fashion-mnist")
    searched = []
    if data_dir is None:
        if dataset == "fashion-mnist":
            if find_idx_dir(dataset, DEBIAN_FASHION_MNIST, splits):
                return DEBIAN_FASHION_MNIST
            searched.append(DEBIAN_FASHION_MNIST)
        data_dir = DEFAULT_DATA_DIR
    data_dir = Path(data_dir)
    found = find_idx_dir(dataset, data_dir, splits)
    if found is not None:
        return found
    searched += _search_dirs(dataset, data_dir)
    if not download:
        raise FFNNError(_no_data_message(dataset, searched, splits, "downloading is off (--no-download)"))
    return _download(dataset, data_dir, splits, searched)


def load(dataset: str = "mnist", data_dir: str | Path | None = None, device: str | torch.device = "cpu",
         download: bool = True, splits: tuple[str, ...] = ("train", "test"),
         normalization: str = DEFAULT_NORMALIZATION) -> Data:
    """Read, normalise (see ``NORMALIZATIONS``) and move to ``device`` the requested splits
    (others are left empty)."""
    directory = locate(dataset, data_dir, download, splits)
    classes = CLASSES[dataset]
    tensors, shape = {}, None
    for split in ("train", "test"):
        if split in splits:
            images, labels = read_split(directory, split, len(classes))
            if shape is not None and tuple(images.shape[1:]) != shape:
                raise IDXError(f"{directory}: train images are {shape} but test images are {tuple(images.shape[1:])}")
            shape = tuple(images.shape[1:])
            # uint8 crosses to the device (4x fewer bytes than float), then is normalised there
            x = normalize(images.to(device).flatten(1), normalization)
            tensors[split] = (x, labels.to(device))
        else:
            tensors[split] = (torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device))
    return Data(dataset, classes, *tensors["train"], *tensors["test"], image_shape=shape, source=str(directory))


def steps_per_epoch(num_samples: int, batch_size: int, keep_last: bool = False) -> int:
    """Batches per epoch: full ones only (60000 / 64: 937), or with ``keep_last`` the partial
    last one too (5000 / 64: 79)."""
    return -(-num_samples // batch_size) if keep_last else num_samples // batch_size


def epoch_batches(num_samples: int, batch_size: int, generator: torch.Generator, device: torch.device,
                  shard: tuple[int, int] | None = None, keep_last: bool = False) -> tuple[torch.Tensor, ...]:
    """One epoch of index batches: a permutation drawn on the CPU from ``generator`` (the same
    on every device and every rank), cut into batches of ``batch_size`` on ``device``, of which
    each batch keeps columns [lo, hi) of ``shard`` (a rank's part).

    The last partial batch is dropped (like DataLoader's drop_last) so every step has the same
    shape, which a captured CUDA graph needs; ``keep_last`` keeps it (as DataLoader does by
    default), for eager single-process runs."""
    perm = torch.randperm(num_samples, generator=generator)
    if keep_last:
        if shard is not None:
            raise ValueError("keep_last cannot be combined with a shard: the last batch has another size")
        return perm.to(device).split(batch_size)
    steps = steps_per_epoch(num_samples, batch_size)
    perm = perm[: steps * batch_size].view(steps, batch_size)
    if shard is not None:
        perm = perm[:, shard[0]:shard[1]]
    return perm.to(device).unbind(0)
