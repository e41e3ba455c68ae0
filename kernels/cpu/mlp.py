"""The MLP training step on CPU tensors: launcher of csrc/mlp.cpp (see kernels/ops/mlp.py)."""
from __future__ import annotations

import torch

from kernels.cpu import address, dtype_name, extension, num_threads
from kernels.reference.cross_entropy import bad_target_error

# The fields of one layer in the list the C++ step takes (csrc/mlp.cpp restates them as its
# LayerField enum and exports the names as kernels._C.mlp_layer_fields; a test compares them).
LAYER_FIELDS = ("weight", "bias", "grad_weight", "grad_bias", "output", "grad_output", "in_features", "out_features")


NO_UPDATE = ("", 0, 0, ())
# The only ignore_index the step takes: F.cross_entropy's default (csrc/mlp.cpp restates it as
# kIgnoreIndex and exports it as kernels._C.mlp_ignore_index; a test compares the three).
IGNORE_INDEX = -100


def step(x: torch.Tensor, target: torch.Tensor, layers: list[int], activation: str,
         index: torch.Tensor | None = None, x_batch: torch.Tensor | None = None,
         target_batch: torch.Tensor | None = None, update: tuple = NO_UPDATE) -> torch.Tensor:
    """Forward, mean cross-entropy and backward of the MLP that ``layers`` describes (LAYER_FIELDS
    per layer) on a contiguous batch x (M, in_features) and int64 target (M,), or, given a
    contiguous int64 ``index``, on those rows of x and target, gathered into the contiguous x_batch
    (M, in_features) and target_batch (M,): one step for an index of shape (M,), S steps for one of
    shape (S, M), which need ``update``, (op, table address, rows, arguments) from a fused
    optimizer's ``native_update``, run after each step's backward. Returns the loss, of shape ()
    for one step and (S,) for S. Raises ValueError naming the first target out of range (checked
    for every step before any runs: nothing is written then), IndexError for an index out of
    range."""
    loss = x.new_empty(size=() if index is None else index.shape[:-1])  # a loss per step
    steps, M = loss.numel(), x.shape[0] if index is None else index.shape[-1]
    bad = extension().mlp_step(dtype_name(x), x.data_ptr(), target.data_ptr(), address(index), x.shape[0],
                               address(x_batch), address(target_batch), loss.data_ptr(), M, steps, layers, activation,
                               *update, num_threads())
    if bad >= 0:
        s, row = divmod(bad, M)
        batch_target = target if index is None else target[index.reshape(-1)[s * M:(s + 1) * M]]
        error = bad_target_error(batch_target, row, layers[-1], IGNORE_INDEX)
        raise error if steps == 1 else ValueError(f"MLPStep: step {s} of the {steps}: {error}")
    return loss
