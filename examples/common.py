"""What the example scripts share: their command line, and MNIST-style data as the tutorials'
DataLoaders deliver it (real files when present, a small synthetic set otherwise)."""
from __future__ import annotations

import argparse
import math

import torch

from ffnn import data as datasets
from ffnn.cli import add_device_options, resolve_device
from ffnn.errors import FFNNError

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 640, 320


def parser(doc: str, *, epochs: int, print_every: int | None = None,
           dataset: str | None = None) -> argparse.ArgumentParser:
    """The options every example has, described by the first paragraph of ``doc``, with the
    tutorial's own epochs as default; ``print_every`` (the tutorial's interval between progress
    lines) adds --print-every, and ``dataset`` (the tutorial's dataset) the data options and
    --steps."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_device_options(p)
    p.add_argument("--epochs", type=int, default=epochs, help="(default: %(default)s, the tutorial's)")
    if print_every is not None:
        p.add_argument("--print-every", type=int, default=print_every, help="steps between progress lines "
                       "(default: %(default)s, the tutorial's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the shuffling")
    if dataset is not None:
        p.add_argument("--steps", type=int, default=None,
                       help="stop each epoch after this many training steps (a quick run; default: all)")
        p.add_argument("--dataset", choices=tuple(datasets.CLASSES), default=dataset,
                       help="(default: %(default)s; Debian's dataset-fashion-mnist package provides fashion-mnist)")
        p.add_argument("--data-dir", default=None, help="directory holding the four IDX files")
        p.add_argument("--no-download", dest="download", action="store_false",
                       help="do not try to download the dataset when its files are absent")
        p.add_argument("--synthetic", action="store_true",
                       help=f"train on a synthetic set ({SYNTHETIC_TRAIN} + {SYNTHETIC_TEST} images) instead")
    return p


class Loader:
    """Batches of (images (B, 1, 28, 28), labels) like a DataLoader over a torchvision MNIST
    dataset, from tensors already in memory: reshuffled every epoch from a seeded generator when
    ``shuffle``, the last batch partial. ``len(loader)`` is the number of batches and
    ``len(loader.dataset)`` the number of samples, as with a DataLoader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 max_steps: int | None = None) -> None:
        self.dataset = labels  # only its length is used, as the tutorials use len(loader.dataset)
        self.images, self.labels, self.batch_size, self.shuffle = images, labels, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.max_steps = max_steps

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        batches = order.to(self.labels.device).split(self.batch_size)
        for index in batches[:self.max_steps]:
            yield self.images[index], self.labels[index]


def synthetic_split(num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (num, 28, 28) of 10 classes, each a fixed random pattern plus noise: learnable
    in a few steps, so a short run shows the loss falling."""
    patterns = torch.randint(0, 256, (10, 28, 28), generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, 10, (num,), generator=generator)
    noise = torch.randint(-128, 129, (num, 28, 28), generator=generator)
    return (patterns[labels] // 3 + 85 + noise).clamp(0, 255).to(torch.uint8), labels


def mnist(args: argparse.Namespace, batch_size: int, pixels: str):
    """(train loader, test loader, class names) for ``args.dataset``, or the synthetic set when
    asked for or when the files cannot be had (the script then says so). ``pixels``: "unit" is ToTensor()'s
    [0, 1]; "tutorial" adds Normalize((0.5,), (0.5,)), giving [-1, 1] (see ffnn.data.NORMALIZATIONS)."""
    classes = datasets.CLASSES[args.dataset]
    if args.synthetic:
        source = None
    else:
        try:
            source = datasets.locate(args.dataset, args.data_dir, download=args.download)
        except FFNNError as e:
            print(f"{e}\n-> using a synthetic set of {SYNTHETIC_TRAIN} + {SYNTHETIC_TEST} images instead")
            source = None
    if source is None:
        generator = torch.Generator().manual_seed(args.seed)
        splits = {"train": synthetic_split(SYNTHETIC_TRAIN, generator), "test": synthetic_split(SYNTHETIC_TEST, generator)}
    else:
        splits = {split: datasets.read_split(source, split, len(classes)) for split in ("train", "test")}
    on = resolve_device(args.device)
    tensors = {}
    for split, (images, labels) in splits.items():
        images = images.to(on).unsqueeze(1)
        x = datasets.normalize(images, pixels)
        tensors[split] = (x, labels.to(on))
    train = Loader(*tensors["train"], batch_size, shuffle=True, seed=args.seed, max_steps=args.steps)
    test = Loader(*tensors["test"], batch_size, shuffle=False)
    return train, test, classes
