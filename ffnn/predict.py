"""Predict the class of one image with a trained checkpoint, with every class's probability.

    python -m ffnn.predict --checkpoint runs/mnist-fused/checkpoint.pt digit.png
    python -m ffnn.predict --checkpoint runs/mnist-fused/checkpoint.pt --index 0   # test image 0

The image is converted to grayscale, padded to a square with its border's colour (MNIST and
Fashion-MNIST centre each item in a square; stretching would distort it) and resized to 28x28
when it is another size. MNIST and Fashion-MNIST draw light strokes on a dark background; an
image with a light border is inverted (``--invert auto``, the default). The pixels are then
normalised as the checkpoint's run was.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below
    from ffnn.launch import exit_quietly_on_ctrl_c

    exit_quietly_on_ctrl_c()

import argparse
import sys
from pathlib import Path

import torch

from ffnn import checkpoint, data as datasets
from ffnn.cli import add_data_options, add_device_options, resolve_device, run_command
from ffnn.errors import FFNNError

PROG = "ffnn-predict"


def _pixels(img) -> torch.Tensor:
    """A grayscale PIL image as a uint8 tensor (height, width)."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width)


def _border(pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def read_image(path: str | Path, shape: tuple[int, int] = (28, 28), invert: str = "auto") -> tuple[torch.Tensor, str]:
    """(uint8 tensor of ``shape``, a note on what was done to it) for the image file at ``path``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FFNNError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            mode = img.mode
            img = img.convert("L")
    except (UnidentifiedImageError, OSError) as e:
        raise FFNNError(f"{path} is not an image file PIL can read (PNG, JPEG, ...): {e}") from e
    notes = [f"{img.width}x{img.height} " + ("grayscale" if mode == "L" else f"{mode}, converted to grayscale")]
    if img.width != img.height:
        side = max(img.size)
        background = int(_border(_pixels(img)).float().median())
        square = Image.new("L", (side, side), background)
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = square
        notes.append(f"padded to {side}x{side}")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.LANCZOS)
        notes.append(f"resized to {shape[1]}x{shape[0]}")
    pixels = _pixels(img)
    if invert == "yes" or (invert == "auto" and _border(pixels).float().mean() > 127):
        pixels = 255 - pixels
        notes.append("inverted to light-on-dark")
    return pixels, ", ".join(notes)


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax of the model's logits for normalised images x (N, features)."""
    return torch.softmax(model(x.to(next(model.parameters()).device)).float(), dim=1).cpu()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...)")
    p.add_argument("--index", type=int, default=None, help="predict test-set image INDEX instead of a file")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of ffnn.train, or a bare fc1..fcK state_dict")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="invert the image (auto: when its border is light) (default: %(default)s)")
    add_data_options(p)
    add_device_options(p)
    args = p.parse_args(argv)
    if (args.image is None) == (args.index is None):
        p.error("give either an IMAGE file or --index i")
    return args


def predict(args: argparse.Namespace) -> int:
    ckpt = checkpoint.load(args.checkpoint)
    run = ckpt.get("args", {})
    dataset = args.dataset or run.get("dataset", "mnist")
    normalization = args.normalize or run.get("normalize", datasets.DEFAULT_NORMALIZATION)
    classes = datasets.CLASSES[dataset]
    device = resolve_device(args.device)
    shape = tuple(ckpt.get("image_shape", (28, 28)))
    truth = None
    if args.index is not None:
        data = datasets.load(dataset, args.data_dir or run.get("data_dir"), "cpu", args.download, splits=("test",),
                             normalization=normalization)
        if not 0 <= args.index < len(data.test_y):
            raise FFNNError(f"--index {args.index} is out of range: the {dataset} test set has {len(data.test_y)} images")
        x = data.test_x[args.index]
        truth = int(data.test_y[args.index])
        what = f"{dataset} test image {args.index} (label {classes[truth]})"
    else:
        pixels, notes = read_image(args.image, shape, args.invert)
        x = datasets.normalize(pixels.flatten(), normalization)
        what = f"{args.image} ({notes})"
    model = checkpoint.model_from(ckpt, args.impl, device, x.numel(), len(classes))
    probs = class_probabilities(model, x[None])[0]
    best = int(probs.argmax())
    print(f"image: {what}")
    print(f"predicted: {classes[best]}  (probability {probs[best].item():.4f})"
          + ("" if truth is None else ("  correct" if best == truth else f"  wrong, label is {classes[truth]}")))
    width = max(len(c) for c in classes)
    for i, (name, p) in enumerate(zip(classes, probs.tolist())):
        print(f"  {i}  {name:<{width}}  {p:.4f}  {'#' * round(40 * p)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, predict, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
