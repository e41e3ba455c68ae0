"""The MLP training step on CPU tensors: launcher of csrc/mlp.cpp (see kernels/ops/mlp.py)."""
from __future__ import annotations

import torch

from kernels.cpu import dtype_name, extension, num_threads
from kernels.reference.cross_entropy import bad_target_error

# The fields of one layer in the list the C++ step takes (csrc/mlp.cpp restates them as its
# LayerField enum and exports the names as kernels._C.mlp_layer_fields; a test compares them).
LAYER_FIELDS = ("weight", "bias", "grad_weight", "grad_bias", "output", "grad_output", "in_features", "out_features")


def step(x: torch.Tensor, target: torch.Tensor, layers: list[int], activation: str) -> torch.Tensor:
    """Forward, mean cross-entropy and backward of the MLP that ``layers`` describes (LAYER_FIELDS
    per layer) on a contiguous batch x (M, in_features) and int64 target (M,); returns the loss.
    Raises ValueError naming the first target out of range (no gradient is written then)."""
    loss = x.new_empty(size=())
    bad_row = extension().mlp_step(dtype_name(x), x.data_ptr(), target.data_ptr(), loss.data_ptr(), x.shape[0],
                                   layers, activation, num_threads())
    if bad_row >= 0:
        raise bad_target_error(target, bad_row, layers[-1], -100)
    return loss
