"""FusedAdam and FusedAdamW: torch.optim.Adam and AdamW with one kernel launch per parameter group.

Drop-in replacements: the constructor arguments, the update (PyTorch's lerp for the first moment,
bias corrections in double, as PyTorch computes them) and the state_dict of torch.optim.Adam /
AdamW (per parameter ``step``, ``exp_avg``, ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``;
the same param_groups keys), so a checkpoint moves between the torch class and ours in both
directions. Complex parameters are updated as torch.optim.Adam updates them (as real views).

Each backend module (kernels/{triton,cpu,reference}/adam.py, picked by kernels._dispatch from the
group's device) has ``table(entries, device)``, which builds what its kernel walks, and
``step(table, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize)``. The tables,
when they are rebuilt and the states they point to are kept by kernels/ops/param_table.py, which
FusedSGD shares. Every parameter's ``step`` is a float32 scalar on the parameter's device that the
kernel reads and increments itself, so a step never synchronises with the host and
(``capturable=True``) can be captured in a CUDA graph. Low-precision (bfloat16/float16)
parameters keep float32 states; their gradients have the parameter's dtype.

On the CPU the step flushes subnormal numbers to zero (x86's DAZ/FTZ, for the duration of the
call only): moments of a parameter whose gradient stays zero decay into that range, where x86
arithmetic is ~15x slower. A first moment below ~1e-37 then stays put instead of decaying to 0;
what it adds to its parameter (under 1e-32 per step) is below any parameter's rounding step.

Under ``torch.compile`` the step runs as the custom op ``torch.ops.kernels.adam_step`` (its
mutated tensors annotated, with a fake implementation), which builds its table at every call: a
compiled training step that calls ``opt.step()`` traces through it without a graph break.
"""
from __future__ import annotations

import torch

from kernels._dispatch import implementation
from kernels.ops.param_table import (ADAM_LAYOUT, FusedOptimizer, check_state_shape, entries_by_dtype,
                                     state_dtype)

OP = "adam"
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

__all__ = ["FusedAdam", "FusedAdamW"]


def check_hyperparameters(group: dict) -> None:
    """The checks (and messages) of torch.optim.Adam's constructor, applied to every group."""
    lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def prepare_state(states, p: torch.Tensor, group: dict, where: str) -> dict:
    """Create the state of ``p`` as torch.optim.Adam lays it out (an empty or cleared state starts
    afresh, as in torch), or check and convert a loaded one: a float32 ``step`` on the parameter's
    device, moments of p's shape in state_dtype(p), laid out like ``p``."""
    state = states[p]
    amsgrad = group["amsgrad"]
    dtype = state_dtype(p)
    step = state.get("step")
    if not isinstance(step, torch.Tensor):  # filled on the device: no copy from pageable host memory
        state["step"] = torch.full((), float(step or 0), dtype=torch.float32, device=p.device)
    elif step.dtype != torch.float32 or step.device != p.device or step.dim() != 0:
        state["step"] = step.detach().to(device=p.device, dtype=torch.float32).reshape(())
    for key in MOMENTS if amsgrad else MOMENTS[:2]:
        moment = state.get(key)
        if moment is None:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            continue
        check_state_shape(where, key, moment, p)
        if moment.dtype != dtype or moment.device != p.device or moment.stride() != p.stride():
            state[key] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(moment)
    return {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
            "max_exp_avg_sq": state["max_exp_avg_sq"] if amsgrad else None, "step": state["step"]}


class FusedAdam(FusedOptimizer):
    """torch.optim.Adam with one fused kernel launch per parameter group (see the module doc).

    Arguments are torch.optim.Adam's. ``foreach`` and ``differentiable`` must stay None/False
    (the step is always this library's fused kernel, outside autograd); ``fused`` is accepted
    and kept in the state_dict. ``capturable=True`` allows capturing ``step()`` in a CUDA graph;
    a float ``lr`` is then frozen into the graph, so schedule a tensor ``lr`` on the device
    (schedulers update it in place); tensor betas on the device are read by the kernel too.
    """

    op = OP
    layout = ADAM_LAYOUT
    state_keys = MOMENTS
    row_options = ("amsgrad",)  # a row has a max_exp_avg_sq
    group_defaults = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                          fused=None, decoupled_weight_decay=False)

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False):
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)


    check_hyperparameters = staticmethod(check_hyperparameters)
    prepare_state = staticmethod(prepare_state)

    @staticmethod
    def hyperparameters(group: dict) -> tuple:
        beta1, beta2 = group["betas"]
        return (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["decoupled_weight_decay"],
                group["amsgrad"], group["maximize"])

    @staticmethod
    def compiled_launch(group: dict, params: list, fields: list[dict], backend: str) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        torch.ops.kernels.adam_step(
            params, [p.grad for p in params], [f["exp_avg"] for f in fields], [f["exp_avg_sq"] for f in fields],
            [f["max_exp_avg_sq"] for f in fields] if group["amsgrad"] else [], [f["step"] for f in fields],
            0.0 if lr_tensor is not None else float(lr), lr_tensor, float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), bool(group["decoupled_weight_decay"]), bool(group["amsgrad"]),
            bool(group["maximize"]), backend)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) on FusedAdam's kernels."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


@torch.library.custom_op("kernels::adam_step",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def _adam_step_op(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                  lr: float, lr_tensor: torch.Tensor | None, beta1: float, beta2: float, eps: float,
                  weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool, backend: str) -> None:
    """One Adam step of these tensors on ``backend`` (a tensor ``lr_tensor`` replaces ``lr``)."""
    impl = implementation(OP, backend)
    fields = [{"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": max_exp_avg_sqs[i] if amsgrad else None, "step": s}
              for i, (m, v, s) in enumerate(zip(exp_avgs, exp_avg_sqs, steps))]
    for entries in entries_by_dtype(ADAM_LAYOUT, params, grads, fields).values():
        impl.step(impl.table(entries, params[0].device), lr if lr_tensor is None else lr_tensor, beta1, beta2, eps,
                  weight_decay, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)


@_adam_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
      weight_decay, decoupled, amsgrad, maximize, backend) -> None:
    return None
