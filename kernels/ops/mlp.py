"""The training step of a plain MLP in one native call: ``kernels.MLPStep``.

For a chain of ``FusedLinear`` layers (the hidden ones sharing one activation, the last one
without: its output is the logits) trained with the mean softmax cross-entropy,
``MLPStep(layers)(x, target)`` returns the loss and leaves in every parameter's ``.grad`` what

    zero the gradients; loss = kernels.cross_entropy(model(x), target); loss.backward()

leaves there, computed by the same C++ kernels in one call (csrc/mlp.cpp): no autograd graph,
no Python between the layers, and no allocation once a batch size has been seen (the layers'
outputs and their gradients live in buffers kept per batch size). The optimizer step follows as
usual, e.g. ``kernels.FusedAdam``'s (one call for all parameters), or, with
``MLPStep(layers, optimizer)``, inside the same call: the whole training step, then, is one
native call.

CPU tensors only (float32 or float64); ignore_index is -100, as F.cross_entropy's default. Any
other model, loss or device takes the autograd path, for which the ops are drop-ins.
"""
from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter, is_

import torch

from kernels._dispatch import SUPPORTED_DTYPES, check_tensor, dtype_names
from kernels.cpu import address, mlp as cpu
from kernels.ops.linear import FusedLinear
from kernels.ops.param_table import FusedOptimizer

OP = "MLPStep"


class MLPStep:
    """``step = MLPStep(model.children())``; ``loss = step(x, target)``, or ``step(x_all,
    target_all, index)`` for the rows ``index`` of a resident dataset (gathered into a kept
    buffer). With the optimizer inside, a 2-D ``index`` of shape (S, M) runs S steps, step s on
    rows ``index[s]``, and returns their S losses: as S calls would, to the bit, in one native
    call where the optimizer's step is one launch (with the hyper-parameters it has at the call;
    every step's targets are checked before the first runs), in S calls otherwise (then an
    out-of-range target in step s raises after the steps before it ran). Parameters may be
    replaced between calls (their addresses are read on every call); a ``.grad`` that is missing
    or not a contiguous tensor of the parameter's shape and dtype is replaced by a new one, any
    other is overwritten in place.

    ``optimizer``: a ``kernels.FusedAdam``, ``FusedAdamW`` or ``FusedSGD``; each call then also
    makes its step, as ``optimizer.step()`` after the backward would, and where that step is one
    C++ launch (one parameter group of CPU tensors of one dtype) inside the native call. That
    update does not go through ``torch.optim.Optimizer.step``, so step hooks registered on the
    optimizer do not run for it (pass no optimizer and call ``optimizer.step()`` to keep them)."""

    def __init__(self, layers: Iterable[FusedLinear], optimizer: FusedOptimizer | None = None) -> None:
        if optimizer is not None and not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"{OP}: optimizer must be a kernels.FusedAdam, FusedAdamW or FusedSGD, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        layers = list(layers)
        if not layers:
            raise ValueError(f"{OP}: needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, FusedLinear):
                raise TypeError(f"{OP}: layer {i} is a {type(layer).__name__}, not a kernels.FusedLinear")
            if i and layer.in_features != layers[i - 1].out_features:
                raise ValueError(f"{OP}: layer {i} takes {layer.in_features} features but layer {i - 1} gives "
                                 f"{layers[i - 1].out_features}")
        if layers[-1].activation != "none":
            raise ValueError(f"{OP}: the last layer gives the logits, so its activation must be 'none', "
                             f"got {layers[-1].activation!r}")
        hidden = {layer.activation for layer in layers[:-1]}
        if len(hidden) > 1 or "none" in hidden:
            raise ValueError(f"{OP}: the hidden layers must share one activation other than 'none', "
                             f"got {[layer.activation for layer in layers[:-1]]}")
        self.layers = layers
        self.activation = hidden.pop() if hidden else "none"
        self._buffers: dict[tuple[int, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        # (parameters, gradients, their addresses) as the last full check found them
        self._checked: tuple[list, list, list[int], list[int]] | None = None
        self._layer_lists: dict[int, list[int]] = {}  # by batch size, for the checked tensors
        self._gathered: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self._check_parameters()
        check_tensor(OP, "input", x, backend="cpu", dim=2)
        if x.dtype != dtype or not x.is_cpu:
            raise TypeError(f"{OP}: input is {x.dtype} on {x.device}, the parameters are {dtype} on cpu")
        if x.shape[1] != self.layers[0].in_features:
            raise ValueError(f"{OP}: input of shape {tuple(x.shape)} has {x.shape[1]} features, the first layer "
                             f"takes {self.layers[0].in_features}")
        if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.dtype != torch.int64 or not target.is_cpu:
            raise TypeError(f"{OP}: target must be a 1-D int64 CPU tensor of class indices, got "
                            f"{getattr(target, 'dtype', type(target).__name__)} of shape {tuple(getattr(target, 'shape', ()))}")
        if target.shape[0] != x.shape[0]:
            raise ValueError(f"{OP}: target has {target.shape[0]} rows but input has {x.shape[0]}")
        x, target = x.contiguous(), target.contiguous()
        if index is None:
            gathered, M = (None, None, None), x.shape[0]
        else:
            if (not isinstance(index, torch.Tensor) or index.dim() not in (1, 2) or index.dtype != torch.int64
                    or not index.is_cpu):
                raise TypeError(f"{OP}: index must be a 1-D (one step) or 2-D (a step per row) int64 CPU tensor of "
                                "row numbers")
            if index.dim() == 2 and self.optimizer is None:
                raise ValueError(f"{OP}: an index of shape {tuple(index.shape)} asks for {index.shape[0]} steps, which "
                                 "need the optimizer inside (MLPStep(layers, optimizer))")
            if index.dim() == 2 and index.shape[0] == 0:  # no steps: nothing to check, run or launch
                return x.new_empty(0)
            index = index.contiguous()
            M = index.shape[-1]
            gathered = (index, *self._gather_buffers(M, x.shape[1], dtype))
        layers = self._layer_list(M, dtype)
        if self.optimizer is None:
            return cpu.step(x, target, layers, self.activation, *gathered)
        native = self.optimizer.native_update()
        if native is None:
            if index is not None and index.dim() == 2:  # one call per step, as the update is not one launch
                return torch.stack([self(x, target, rows) for rows in index])
            loss = cpu.step(x, target, layers, self.activation, *gathered)
            self.optimizer.step()
            return loss
        table, update = native
        loss = cpu.step(x, target, layers, self.activation, *gathered, update)
        table.launched()
        return loss

    def _check_parameters(self) -> torch.dtype:
        """Checks the parameters and their gradients (see the class doc) and returns their dtype.
        A call that finds the same parameter and gradient tensors at the addresses the last call
        checked skips the checks: only a replaced tensor (or one given new storage) can fail them."""
        params = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None]
        grads = list(map(_grad_of, params))
        checked = self._checked
        if (checked is not None and all(map(is_, params, checked[0])) and all(map(is_, grads, checked[1]))
                and list(map(_data_ptr, params)) == checked[2] and list(map(address, grads)) == checked[3]):
            return params[0].dtype
        dtype = params[0].dtype
        for p in params:
            if not p.is_cpu or p.dtype != dtype or dtype not in SUPPORTED_DTYPES["cpu"]:
                raise TypeError(f"{OP}: runs on CPU parameters of one dtype ({dtype_names('cpu')}), got a {p.dtype} "
                                f"parameter on {p.device}; other devices take the autograd path")
            if not p.is_contiguous():
                raise ValueError(f"{OP}: a parameter of shape {tuple(p.shape)} is not contiguous")
        grads = [_grad(p) for p in params]
        self._checked = (params, grads, list(map(_data_ptr, params)), list(map(_data_ptr, grads)))
        self._layer_lists.clear()
        return dtype

    def _layer_list(self, M: int, dtype: torch.dtype) -> list[int]:
        """The C++ step's description of the layers (LAYER_FIELDS each) for batches of M rows, made
        once per batch size from the checked addresses and the kept output buffers."""
        layers = self._layer_lists.get(M)
        if layers is None:
            outputs, grad_outputs = self._batch_buffers(M, dtype)
            addresses = iter(zip(self._checked[2], self._checked[3]))
            layers = []
            for layer, output, grad_output in zip(self.layers, outputs, grad_outputs):
                weight, grad_weight = next(addresses)
                bias, grad_bias = next(addresses) if layer.bias is not None else (0, 0)
                layers += [weight, bias, grad_weight, grad_bias, output.data_ptr(), grad_output.data_ptr(),
                           layer.in_features, layer.out_features]
            self._layer_lists[M] = layers
        return layers

    def _gather_buffers(self, M: int, K: int, dtype: torch.dtype):
        key = (M, dtype)
        if key not in self._gathered:
            self._gathered[key] = (torch.empty(M, K, dtype=dtype), torch.empty(M, dtype=torch.int64))
        return self._gathered[key]

    def _batch_buffers(self, M: int, dtype: torch.dtype):
        key = (M, dtype)
        if key not in self._buffers:
            outputs = [torch.empty(M, layer.out_features, dtype=dtype) for layer in self.layers]
            self._buffers[key] = (outputs, [torch.empty_like(o) for o in outputs])
        return self._buffers[key]


_grad_of, _data_ptr = attrgetter("grad"), torch.Tensor.data_ptr


def _grad(p: torch.Tensor) -> torch.Tensor:
    """p.grad, made a contiguous tensor of p's shape and dtype if it is not one."""
    g = p.grad
    if g is None or g.shape != p.shape or g.dtype != p.dtype or not g.is_contiguous() or not g.is_cpu:
        g = p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
    return g
