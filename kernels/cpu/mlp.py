"""The MLP training step on CPU tensors: launcher of csrc/mlp.cpp (see kernels/ops/mlp.py)."""
from __future__ import annotations

import torch

from kernels.cpu import address, dtype_name, extension, num_threads
from kernels.reference.cross_entropy import bad_target_error

# The fields of one layer in the list the C++ step takes (csrc/mlp.cpp restates them as its
# LayerField enum and exports the names as kernels._C.mlp_layer_fields; a test compares them).
LAYER_FIELDS = ("weight", "bias", "grad_weight", "grad_bias", "output", "grad_output", "in_features", "out_features")


NO_UPDATE = ("", 0, 0, [], [])


def step(x: torch.Tensor, target: torch.Tensor, layers: list[int], activation: str,
         index: torch.Tensor | None = None, x_batch: torch.Tensor | None = None,
         target_batch: torch.Tensor | None = None, update: tuple = NO_UPDATE) -> torch.Tensor:
    """Forward, mean cross-entropy and backward of the MLP that ``layers`` describes (LAYER_FIELDS
    per layer) on a contiguous batch x (M, in_features) and int64 target (M,), or, given a
    contiguous int64 ``index`` (M,), on those rows of x and target, gathered into the contiguous
    x_batch (M, in_features) and target_batch (M,); returns the loss. Raises ValueError naming
    the first target out of range (no gradient is written then), IndexError for an index out of
    range. ``update`` (op, table address, rows, scalars, flags), from a fused optimizer's
    ``native_update``, is run after the backward."""
    loss = x.new_empty(size=())
    M = x.shape[0] if index is None else index.shape[0]
    bad_row = extension().mlp_step(dtype_name(x), x.data_ptr(), target.data_ptr(), address(index), x.shape[0],
                                   address(x_batch), address(target_batch), loss.data_ptr(), M, layers, activation,
                                   *update, num_threads())
    if bad_row >= 0:
        raise bad_target_error(target if index is None else target_batch, bad_row, layers[-1], -100)
    return loss
