"""FusedAdam's CPU backend: csrc/adam.cpp's step over a group's table in a host array.

``table(entries, device)`` packs the rows (kernels/ops/param_table.py's ADAM_LAYOUT) into an
array the C++ step reads in place; ``set_gradients`` writes new gradients' addresses into it;
``step`` runs one Adam/AdamW step over it, the GIL released.
"""
from __future__ import annotations

from array import array
from itertools import chain
from typing import NamedTuple

import torch

from kernels.cpu import dtype_name, extension, num_threads
from kernels.ops.param_table import Entry


class Table(NamedTuple):
    """The rows of one launch, as the C++ steps read them (csrc/param_table.h)."""

    dtype: str  # dtype_name of the parameters
    rows: array  # the int64 fields, row after row
    address: int  # of rows' buffer
    count: int  # number of rows


def table(entries: list[Entry], device: torch.device) -> Table:
    rows = array("q", chain.from_iterable(e.row for e in entries))
    return Table(dtype_name(entries[0].tensors["param"]), rows, rows.buffer_info()[0], len(entries))


def set_gradients(table: Table, field: int, addresses: list[int]) -> None:
    """Writes new gradient addresses (one per row) into field ``field`` of the rows, in place."""
    table.rows[field::len(table.rows) // table.count] = array("q", addresses)


def step(table: Table, lr, beta1, beta2, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
         maximize: bool) -> None:
    """One Adam (AdamW with ``decoupled``) step of the table's tensors; tensor hyper-parameters are
    CPU tensors here, read without a synchronisation. The other arguments go to the C++ step as
    they are (pybind11 takes a Python int as a double), as in kernels/cpu/sgd.py."""
    extension().adam_step(table.dtype, table.address, table.count, float(lr), float(beta1), float(beta2), eps,
                          weight_decay, decoupled, amsgrad, maximize, num_threads())
