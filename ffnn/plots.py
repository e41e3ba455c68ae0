"""The figures the commands write: loss curves, a grid of predictions, a confusion matrix."""
from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training against test-set loss per epoch (the tutorials' curves, whose "validation" set is
    the test set)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss")
    ax.plot(epochs, [h["test_loss"] for h in history], "s-", label="test loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_xticks(epochs)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.92)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sample_grid(images: torch.Tensor, labels, predictions, classes, path: str | Path, cols: int = 8,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Images (N, H, W), black to white over ``value_range``, with their label and prediction;
    wrong predictions in red. Drawn as one mosaic in one axes (an axes per image costs about a
    second)."""
    plt = _pyplot()
    low, high = value_range
    n, h, w = images.shape
    rows = (n + cols - 1) // cols
    cell_h, cell_w = h + h // 2, w + w // 7  # room for two lines of caption above each image
    mosaic = torch.full((rows * cell_h, cols * cell_w), low)
    fig, ax = plt.subplots(figsize=(cols * cell_w / 22, rows * cell_h / 22))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    for i, (img, label, pred) in enumerate(zip(images.cpu().float(), labels, predictions)):
        top, left = (i // cols) * cell_h + h // 2, (i % cols) * cell_w
        mosaic[top:top + h, left:left + w] = img
        ok = int(label) == int(pred)
        ax.text(left + w / 2, top - 1, f"label {classes[int(label)]}\npred {classes[int(pred)]}", fontsize=8,
                ha="center", va="bottom", color="limegreen" if ok else "red")
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=low, vmax=high)
    ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def confusion_matrix(matrix: torch.Tensor, classes, path: str | Path, title: str = "") -> Path:
    """Counts of (true class, predicted class), annotated."""
    plt = _pyplot()
    m = matrix.cpu()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k))
    im = ax.imshow(m.numpy(), cmap="Blues")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    threshold = m.max().item() / 2
    for i in range(k):
        for j in range(k):
            v = int(m[i, j])
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
