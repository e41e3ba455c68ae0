"""FusedSGD: torch.optim.SGD with one kernel launch per parameter group.

A drop-in replacement: torch.optim.SGD's arguments, its update rule (momentum with dampening,
whose first step sets the buffer to the gradient; Nesterov; weight decay; maximize), param
groups, schedulers, and its state_dict (``momentum_buffer`` per parameter when momentum is not
zero, nothing otherwise), so a checkpoint moves between torch.optim.SGD and ours in both
directions. The only addition is ``capturable`` (kept in param_groups, which torch.optim.SGD
ignores on loading): like FusedAdam's, it must be True for ``step()`` to be captured in a CUDA
graph. Complex parameters are updated as torch.optim.SGD updates them.

It runs on FusedAdam's machinery (kernels/ops/param_table.py: the tables, when they are rebuilt,
the states). Each backend module (kernels/{triton,cpu,reference}/sgd.py) has
``table(entries, device)`` and ``step(table, lr, momentum, dampening, weight_decay, nesterov,
maximize)``. A table row carries a first_step flag, set when the momentum buffer is created and
cleared by the kernel that runs that first step (on the device for Triton, so a step captured
after one eager step replays correctly). Low-precision (bfloat16/float16) parameters keep a
float32 momentum buffer.

Under ``torch.compile`` the step runs as the custom op ``torch.ops.kernels.sgd_step``.
"""
from __future__ import annotations

import torch

from kernels._dispatch import implementation
from kernels.ops.param_table import SGD_LAYOUT, FusedOptimizer, check_state_shape, entries_by_dtype, state_dtype

OP = "sgd"
BUFFER = "momentum_buffer"

__all__ = ["FusedSGD"]


def check_hyperparameters(group: dict) -> None:
    """The checks (and messages) of torch.optim.SGD's constructor, applied to every group."""
    lr, momentum, dampening, weight_decay = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if group["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def prepare_state(states, p: torch.Tensor, group: dict, where: str) -> dict:
    """Without momentum SGD keeps no state (and touches none). With momentum: a missing buffer
    (a new, cleared or reset state) is created, to be set to the gradient by the first step as
    torch.optim.SGD does; a present one is checked and brought to state_dtype(p) and p's layout."""
    if group["momentum"] == 0:
        return {BUFFER: None, "first_step": 0}
    state = states[p]
    buffer = state.get(BUFFER)
    if buffer is None:
        state[BUFFER] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        return {BUFFER: state[BUFFER], "first_step": 1}
    check_state_shape(where, BUFFER, buffer, p)
    if buffer.dtype != state_dtype(p) or buffer.device != p.device or buffer.stride() != p.stride():
        state[BUFFER] = torch.empty_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format).copy_(buffer)
    return {BUFFER: state[BUFFER], "first_step": 0}


class FusedSGD(FusedOptimizer):
    """torch.optim.SGD with one fused kernel launch per parameter group (see the module doc).

    Arguments are torch.optim.SGD's, plus ``capturable``. ``foreach`` and ``differentiable`` must
    stay None/False; ``fused`` is accepted and kept in the state_dict. A tensor ``lr`` on the
    parameters' device is read by the kernel (schedule it in place to change it inside a CUDA graph).
    """

    op = OP
    layout = SGD_LAYOUT
    state_keys = (BUFFER,)
    row_options = ("momentum",)  # a row has a momentum buffer
    # capturable: a torch.optim.SGD state_dict has none
    group_defaults = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False,
                          capturable=False)

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 capturable: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
                        capturable=capturable)
        super().__init__(params, defaults)


    check_hyperparameters = staticmethod(check_hyperparameters)
    prepare_state = staticmethod(prepare_state)

    @staticmethod
    def hyperparameters(group: dict) -> tuple:
        return (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
                group["maximize"])

    @staticmethod
    def compiled_launch(group: dict, params: list, fields: list[dict], backend: str) -> None:
        lr = group["lr"]
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        momentum = group["momentum"] != 0
        torch.ops.kernels.sgd_step(
            params, [p.grad for p in params], [f[BUFFER] for f in fields] if momentum else [],
            [bool(f["first_step"]) for f in fields] if momentum else [],
            0.0 if lr_tensor is not None else float(lr), lr_tensor, float(group["momentum"]),
            float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]),
            bool(group["maximize"]), backend)


@torch.library.custom_op("kernels::sgd_step", mutates_args=("params", "momentum_buffers"))
def _sgd_step_op(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                 first_steps: list[bool], lr: float, lr_tensor: torch.Tensor | None, momentum: float, dampening: float,
                 weight_decay: float, nesterov: bool, maximize: bool, backend: str) -> None:
    """One SGD step of these tensors on ``backend`` (a tensor ``lr_tensor`` replaces ``lr``)."""
    impl = implementation(OP, backend)
    fields = [{BUFFER: momentum_buffers[i] if momentum_buffers else None,
               "first_step": int(first_steps[i]) if first_steps else 0} for i in range(len(params))]
    for entries in entries_by_dtype(SGD_LAYOUT, params, grads, fields).values():
        impl.step(impl.table(entries, params[0].device), lr if lr_tensor is None else lr_tensor, momentum, dampening,
                  weight_decay, nesterov=nesterov, maximize=maximize)


@_sgd_step_op.register_fake
def _(params, grads, momentum_buffers, first_steps, lr, lr_tensor, momentum, dampening, weight_decay, nesterov,
      maximize, backend) -> None:
    return None
