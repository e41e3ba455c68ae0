"""FusedAdam's update in plain PyTorch, one tensor at a time, as torch.optim.Adam's single-tensor
path computes it: the "torch" backend, with the same ``table`` and ``step`` as the kernels'."""
from __future__ import annotations

import torch

from kernels.ops.param_table import Entry


def table(entries: list[Entry], device: torch.device) -> list[Entry]:
    """The entries themselves: this backend updates their tensors."""
    return entries


@torch.no_grad()
def step(table: list[Entry], lr, beta1, beta2, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
         maximize: bool) -> None:
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    for entry in table:
        t = entry.tensors
        param, exp_avg, exp_avg_sq = t["param"], t["exp_avg"], t["exp_avg_sq"]
        t["step"] += 1
        step = float(t["step"])
        p = param.to(exp_avg.dtype)  # the parameter itself unless it is low precision
        g = t["grad"].to(exp_avg.dtype)
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second_moment = exp_avg_sq
        if amsgrad:
            second_moment = torch.maximum(t["max_exp_avg_sq"], exp_avg_sq, out=t["max_exp_avg_sq"])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if p is not param:
            param.copy_(p)
