"""FusedSGD's CPU backend: csrc/sgd.cpp's step over a group's table in a host array (the same
table as Adam's, with the rows of kernels/ops/param_table.py's SGD_LAYOUT). The step clears the
first_step flags of the rows it has run."""
from __future__ import annotations

from kernels.cpu import extension, num_threads
from kernels.cpu.adam import Table, set_gradients, table

__all__ = ["Table", "table", "set_gradients", "step", "update"]


def step(table: Table, lr, momentum: float, dampening: float, weight_decay, *, nesterov: bool,
         maximize: bool) -> None:
    """One SGD step of the table's tensors (torch.optim.SGD's rule)."""
    scalars, flags = update(lr, momentum, dampening, weight_decay, nesterov=nesterov, maximize=maximize)
    extension().sgd_step(table.dtype, table.address, table.count, *scalars, *flags, num_threads())


def update(lr, momentum: float, dampening: float, weight_decay, *, nesterov: bool,
           maximize: bool) -> tuple[list[float], list[bool]]:
    """The arguments of csrc/sgd.cpp's sgd_step after its table, as (scalars, flags): also what
    csrc/mlp.cpp's step takes to run the update itself."""
    return [float(lr), float(momentum), float(dampening), float(weight_decay)], [nesterov, maximize]
