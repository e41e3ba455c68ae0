"""The tutorials' MNIST MLP, built from the library's fused layers, and its plain PyTorch twin.

Both name their layers fc1..fcK like the tutorials' ``NeuralNetwork`` (nn.Linear fc1-fc3 with
ReLU between), so state_dicts move freely between them and the tutorial's own model.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from ffnn.errors import FFNNError
from kernels.reference.linear import ACTIVATIONS

DEFAULT_SIZES = (784, 128, 64, 10)
# The hidden-layer activations both models have: FusedLinear's, but "none".
TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: function for name, function in ACTIVATIONS.items() if name != "none"
}
IMPLS = ("fused", "torch")


class _LayerStack(nn.Module):
    """fc1..fcK for sizes (in, h1, ..., out); ``make(i, fan_in, fan_out, last)`` builds layer i."""

    def __init__(self, sizes: Sequence[int], activation: str, make) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least (inputs, outputs), all positive, got {sizes}")
        self.sizes, self.activation = sizes, activation
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.add_module(f"fc{i}", make(fan_in, fan_out, last=i == len(sizes) - 1))
        # a plain tuple, not registered again: what forward walks, without getattr per call
        self._layers = tuple(self.children())

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation!r}"


class MLP(_LayerStack):
    """Hidden layers ``kernels.FusedLinear(activation=...)``, the last one without activation
    (logits). Takes (N, 1, 28, 28) or (N, 784)."""

    def __init__(self, sizes: Sequence[int] = DEFAULT_SIZES, activation: str = "relu", *,
                 device=None, dtype=None) -> None:
        super().__init__(sizes, activation, lambda fan_in, fan_out, last: kernels.FusedLinear(
            fan_in, fan_out, activation="none" if last else activation, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self._layers:
            x = layer(x)
        return x


class TorchMLP(_LayerStack):
    """The same network with nn.Linear and the activation function: the tutorial's NeuralNetwork."""

    def __init__(self, sizes: Sequence[int] = DEFAULT_SIZES, activation: str = "relu", *,
                 device=None, dtype=None) -> None:
        if activation not in TORCH_ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(TORCH_ACTIVATIONS)}")
        super().__init__(sizes, activation, lambda fan_in, fan_out, last: nn.Linear(
            fan_in, fan_out, device=device, dtype=dtype))
        self._act = TORCH_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        *hidden, last = self._layers
        for layer in hidden:
            x = self._act(layer(x))
        return last(x)


def build(impl: str = "fused", sizes: Sequence[int] = DEFAULT_SIZES, activation: str = "relu", *,
          seed: int | None = None, device: str | torch.device = "cpu") -> _LayerStack:
    """The model for ``impl`` ('fused' or 'torch'), initialised on the CPU (from ``seed`` when
    given, so both impls start from the same weights on any device), then moved to ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if seed is not None:
        torch.manual_seed(seed)
    return (MLP if impl == "fused" else TorchMLP)(sizes, activation).to(device)


def describe(sizes: Sequence[int], activation: str) -> str:
    """What the commands print for an MLP: "MLP 784-128-64-10 (relu)"; without hidden layers
    there is no activation to name."""
    layers = "-".join(map(str, sizes))
    return f"MLP {layers} ({activation})" if len(sizes) > 2 else f"MLP {layers} (no hidden layer)"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_KEY = re.compile(r"fc(\d+)\.(weight|bias)")


def sizes_from_state_dict(state: dict) -> tuple[int, ...]:
    """The layer sizes (in, h1, ..., out) of an fc1..fcK MLP state_dict, or an FFNNError that
    says why ``state`` is not one."""
    keys = [k for k in state if not k.endswith("_extra_state")]
    layers = {}
    for k in keys:
        m = _KEY.fullmatch(k)
        if m is None:
            raise FFNNError(f"not an MLP state_dict: unexpected key {k!r} (an MLP has fc1.weight, fc1.bias, "
                            f"fc2.weight, ...; this one has {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})")
        layers.setdefault(int(m[1]), {})[m[2]] = state[k]
    n = len(layers)
    if n == 0 or sorted(layers) != list(range(1, n + 1)) or any("weight" not in v for v in layers.values()):
        raise FFNNError(f"not an MLP state_dict: expected fc1.weight .. fc{max(n, 1)}.weight, got {', '.join(keys) or 'no keys'}")
    sizes = [layers[1]["weight"].shape[1]]
    for i in range(1, n + 1):
        w, b = layers[i]["weight"], layers[i].get("bias")
        if w.dim() != 2 or w.shape[1] != sizes[-1] or (b is not None and tuple(b.shape) != (w.shape[0],)):
            raise FFNNError(f"not an MLP state_dict: fc{i}.weight has shape {tuple(w.shape)}"
                            + (f" and fc{i}.bias {tuple(b.shape)}" if b is not None else "")
                            + f", which does not follow a layer of {sizes[-1]} outputs")
        sizes.append(w.shape[0])
    return tuple(sizes)


def loss_function(impl: str):
    """The cross-entropy each impl trains with: ours, or F.cross_entropy (what nn.CrossEntropyLoss calls).
    Both take (logits, target, reduction=...)."""
    return kernels.cross_entropy if impl == "fused" else F.cross_entropy
