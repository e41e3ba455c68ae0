"""FusedSGD's update in plain PyTorch, one tensor at a time, as torch.optim.SGD's single-tensor
path computes it: the "torch" backend, with the same ``table`` and ``step`` as the kernels'."""
from __future__ import annotations

import torch

from kernels.ops.param_table import SGD_LAYOUT, Entry

_FIRST_STEP = SGD_LAYOUT.index("first_step")


class Table(list):
    """The entries, and which of them still take their first momentum step (cleared by step)."""

    def __init__(self, entries: list[Entry]):
        super().__init__(entries)
        self.first_step = [bool(e.row[_FIRST_STEP]) for e in entries]


def table(entries: list[Entry], device: torch.device) -> Table:
    return Table(entries)


@torch.no_grad()
def step(table: Table, lr, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
         maximize: bool) -> None:
    lr, weight_decay = float(lr), float(weight_decay)
    for i, entry in enumerate(table):
        t = entry.tensors
        param = t["param"]
        buffer = t.get("momentum_buffer")
        dtype = buffer.dtype if buffer is not None else param.dtype
        p = param.to(dtype)  # the parameter itself unless it is low precision with a float32 buffer
        g = t["grad"].to(dtype)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if table.first_step[i]:
                buffer.copy_(g)
                table.first_step[i] = False
            else:
                buffer.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buffer, alpha=momentum) if nesterov else buffer
        p.add_(g, alpha=-lr)
        if p is not param:
            param.copy_(p)
