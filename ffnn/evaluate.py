"""Evaluate a checkpoint on the test set: accuracy, per-class accuracy, a confusion-matrix PNG.

    python -m ffnn.evaluate --checkpoint runs/fashion-mnist-fused/checkpoint.pt
"""
from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below
    from ffnn.launch import exit_quietly_on_ctrl_c

    exit_quietly_on_ctrl_c()

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ffnn import checkpoint, data as datasets, plots
from ffnn.cli import add_data_options, add_device_options, plural, resolve_device, run_command
from ffnn.model import loss_function

PROG = "ffnn-evaluate"


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: torch.Tensor  # (classes, classes) int64 on the CPU: [true, predicted]

    @property
    def per_class_accuracy(self) -> torch.Tensor:
        return self.confusion.diagonal() / self.confusion.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, num_classes: int,
                   chunk: int = 8192) -> Evaluation:
    """Mean loss, accuracy and confusion matrix of ``model`` on (x, y), read back once at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=x.device)
    for start in range(0, len(x), chunk):
        logits, target = model(x[start:start + chunk]), y[start:start + chunk]
        loss_sum += loss_fn(logits, target, reduction="sum")
        counts += torch.bincount(target * num_classes + logits.argmax(1), minlength=num_classes * num_classes)
    model.train(was_training)
    confusion = counts.view(num_classes, num_classes).cpu()
    n = max(len(x), 1)
    return Evaluation(loss_sum.item() / n, confusion.diagonal().sum().item() / n, confusion)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint of ffnn.train, or a bare fc1..fcK state_dict")
    add_data_options(p)
    add_device_options(p)
    p.add_argument("--out", default=None, help="confusion-matrix PNG (default: confusion.png next to the checkpoint)")
    return p.parse_args(argv)


def evaluate(args: argparse.Namespace) -> int:
    ckpt = checkpoint.load(args.checkpoint)
    run = ckpt.get("args", {})
    device = resolve_device(args.device)
    data = datasets.load(args.dataset or run.get("dataset", "mnist"), args.data_dir or run.get("data_dir"),
                         device, args.download, splits=("test",),
                         normalization=args.normalize or run.get("normalize", datasets.DEFAULT_NORMALIZATION))
    model = checkpoint.model_from(ckpt, args.impl, device, data.num_features, len(data.classes))
    ev = evaluate_model(model, data.test_x, data.test_y, loss_function(args.impl), len(data.classes))

    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "confusion.png"
    title = f"{data.name} test set, accuracy {100 * ev.accuracy:.2f}%"
    plots.confusion_matrix(ev.confusion, data.classes, out, title=title)

    sizes = "-".join(str(s) for s in ckpt["arch"]["sizes"])
    trained = f", trained {plural(ckpt['epoch'], 'epoch')}" if "epoch" in ckpt else ""
    print(f"checkpoint: {args.checkpoint} (MLP {sizes}{trained})")
    print(f"test set:   {data.name}, {len(data.test_y):,} images from {data.source}")
    print(f"accuracy:   {100 * ev.accuracy:.2f}%  (test loss {ev.loss:.4f})")
    print("per-class accuracy:")
    width = max(len(c) for c in data.classes)
    for name, acc, n in zip(data.classes, ev.per_class_accuracy.tolist(), ev.confusion.sum(1).tolist()):
        print(f"  {name:<{width}}  {100 * acc:6.2f}%  ({n} images)")
    print(f"confusion matrix: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, evaluate, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
