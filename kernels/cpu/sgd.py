"""FusedSGD's CPU backend: csrc/sgd.cpp's step over a group's table in a host array (the same
table as Adam's, with the rows of kernels/ops/param_table.py's SGD_LAYOUT). The step clears the
first_step flags of the rows it has run."""
from __future__ import annotations

from kernels.cpu import extension, num_threads
from kernels.cpu.adam import Table, set_gradients, table

__all__ = ["Table", "table", "set_gradients", "step"]


def step(table: Table, lr, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
         maximize: bool) -> None:
    """One SGD step of the table's tensors (torch.optim.SGD's rule); a tensor ``lr`` is a CPU
    tensor here. The arguments go to the C++ step as they are (pybind11 takes a Python int as a
    double): the step is the launch a small model's training loop pays for at every step."""
    extension().sgd_step(table.dtype, table.address, table.count, float(lr), momentum, dampening, weight_decay,
                         nesterov, maximize, num_threads())
