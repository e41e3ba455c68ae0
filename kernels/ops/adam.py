"""FusedAdam and FusedAdamW: torch.optim.Adam and AdamW with one kernel launch per parameter group.

Drop-in replacements: the constructor arguments, the update (bias corrections in double, as
PyTorch computes them) and the state_dict of torch.optim.Adam / AdamW (per parameter ``step``,
``exp_avg``, ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``; the same param_groups keys),
so a checkpoint moves between the torch class and ours in both directions.

The backend is picked once per group from its device (kernels._dispatch.backend_for): Triton
on CUDA (kernels/triton/adam.py), C++ on the CPU (csrc/adam.cpp), plain PyTorch otherwise
(``adam_reference`` below, also the tests' second opinion). Every parameter's ``step`` is a
float32 scalar on the parameter's device that the kernel reads and increments itself, so a
step never synchronises with the host and (``capturable=True``) can be captured in a CUDA graph.

Each group keeps a plan: its parameters that have a gradient, their states, and the table of
addresses the kernel walks. The plan is rebuilt only when a gradient appears, disappears or
moves to another address, so the steady-state step is a few microseconds of Python plus one
launch per group (one per parameter dtype, if a group mixes dtypes). Low-precision
(bfloat16/float16) parameters keep float32 states; their gradients have the parameter's dtype.

On the CPU the step flushes subnormal numbers to zero (x86's DAZ/FTZ, for the duration of the
call only): moments of a parameter whose gradient stays zero decay into that range, where x86
arithmetic is ~15x slower. A first moment below ~1e-37 then stays put instead of decaying to 0;
what it adds to its parameter (under 1e-32 per step) is below any parameter's rounding step.
"""
from __future__ import annotations

from array import array
from itertools import chain

import torch
from torch.optim import optimizer as _torch_optimizer

from kernels._dispatch import SUPPORTED_DTYPES, backend_for, implementation
from kernels.cpu import dtype_name as cpp_dtype, extension as cpp, num_threads


def triton_op(name):
    return implementation(name, "triton")

__all__ = ["FusedAdam", "FusedAdamW", "adam_reference"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# One row of a group's tensor table, as both backends' kernels read it (csrc/adam.cpp, kernels/triton/adam.py).
TABLE_FIELDS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "numel")
_GRAD_SLOT = TABLE_FIELDS.index("grad")


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


# ------------------------------------------------------------------------------------------
# Plain PyTorch reference (KERNELS_BACKEND=torch, and devices without Triton or C++ kernels)


@torch.no_grad()
def adam_reference(params, grads, states, *, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize):
    """One Adam/AdamW step, one tensor at a time, written as torch.optim.Adam's single-tensor
    path computes it; ``states`` are the optimizer's per-parameter state dicts."""
    lr = float(lr)
    for param, grad, state in zip(params, grads, states):
        state["step"] += 1
        step = float(state["step"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        p = param.to(exp_avg.dtype)  # the parameter itself unless it is low precision
        g = grad.to(exp_avg.dtype)
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
            second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if p is not param:
            param.copy_(p)


# ------------------------------------------------------------------------------------------
# Checks


def _check_hyperparameters(group: dict) -> None:
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


def _dense(t: torch.Tensor) -> bool:
    """Whether the elements of ``t`` fill numel consecutive slots in some dimension order
    (contiguous, channels-last, ...): then an elementwise update can walk its memory flat."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_params(name: str, index: int, params: list) -> None:
    """One device per group, floating dtypes the group's backend computes in, dense storage."""
    device = params[0].device
    backend = backend_for(device)
    for i, p in enumerate(params):
        where = f"{name}: parameter {i} of group {index}"
        if p.device != device:
            raise ValueError(
                f"{where} is on {p.device} but parameter 0 is on {device}; "
                "put the parameters of each device in their own parameter group"
            )
        if not p.is_floating_point():
            raise TypeError(f"{where} has dtype {p.dtype}; Adam optimizes floating-point parameters only")
        if backend in SUPPORTED_DTYPES and p.dtype not in SUPPORTED_DTYPES[backend]:
            allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES[backend])
            raise TypeError(f"{where} has dtype {p.dtype}; the {backend} backend supports {allowed}")
        if p.layout != torch.strided or not _dense(p):
            raise ValueError(f"{where} must be a dense tensor without gaps or overlaps "
                             f"(shape {tuple(p.shape)}, strides {p.stride()})")


# ------------------------------------------------------------------------------------------
# Per-group plans


class _GroupPlan:
    """The cached part of one parameter group's step; subclasses launch one backend's kernel."""

    backend = ""  # the kernels._dispatch backend name

    def __init__(self, optimizer: "FusedAdam", index: int, group: dict):
        self.optimizer = optimizer
        self.index = index
        self.group = group
        self.params = group["params"]
        self.num_params = len(self.params)
        self.amsgrad = bool(group["amsgrad"])
        self.device = self.params[0].device
        self.dtypes = SUPPORTED_DTYPES.get(self.backend)
        self.layout: list | None = None  # parameter addresses and gradient strides the plan was built for
        self.grad_addresses: list[int] = []  # of the gradients it was built or last updated for

    def step(self, group: dict) -> None:
        params = self.params
        grads = [p.grad for p in params]
        try:
            layout = [p.data_ptr() for p in params]
            layout += [None if g is None else g.stride() for g in grads]
            addresses = [g.data_ptr() for g in grads if g is not None]
        except RuntimeError:  # a sparse gradient has no strides; _collect says so
            layout = None
        if layout is None or layout != self.layout:
            self.build(self._collect(grads))
            self.layout, self.grad_addresses = layout, addresses
        elif addresses != self.grad_addresses:
            # The usual case when grads are set to None between steps: new gradient tensors
            # (PyTorch has checked their shape, dtype and device against the parameter) laid out
            # as before, so only their addresses change.
            self.set_grad_addresses(grads, addresses)
            self.grad_addresses = addresses
        self.launch(group)

    def set_grad_addresses(self, grads: list, addresses: list[int]) -> None:
        """Point the launch data at new gradients (``addresses``: those of the non-None ones,
        in parameter order); by default, build it again."""
        self.build(self._collect(grads))

    def _collect(self, grads: list) -> dict[torch.dtype, list[tuple]]:
        """(param, grad, state) of every parameter that has a gradient, by parameter dtype,
        with its state created (torch's layout) or brought to the device and dtypes we use."""
        name = type(self.optimizer).__name__
        buckets: dict[torch.dtype, list[tuple]] = {}
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if p.device != self.device or (self.dtypes and p.dtype not in self.dtypes):
                raise ValueError(f"{name}: parameter {i} of group {self.index} became a {p.dtype} tensor on "
                                 f"{p.device} after the first step on {self.device}; create the optimizer "
                                 "after moving or casting the model")
            where = f"{name}: the gradient of parameter {i} of group {self.index}"
            if g.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients ({where[len(name) + 2:]} is sparse), "
                                   "please consider torch.optim.SparseAdam instead")
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"{where} is a {g.dtype} tensor of shape {tuple(g.shape)} on {g.device}; "
                                 f"the parameter is {p.dtype}, {tuple(p.shape)} on {p.device}")
            if g.stride() != p.stride() and not (g.is_contiguous() and p.is_contiguous()):
                raise ValueError(f"{where} has strides {g.stride()}, the parameter {p.stride()}; "
                                 "the fused step needs both laid out alike")
            state = self.optimizer.state[p]
            _prepare_state(state, p, self.amsgrad)
            buckets.setdefault(p.dtype, []).append((p, g, state))
        return buckets

    def build(self, buckets: dict[torch.dtype, list[tuple]]) -> None:
        raise NotImplementedError

    def launch(self, group: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def rows(items: list[tuple]) -> list[tuple[int, ...]]:
        """The table rows the kernels walk (TABLE_FIELDS): addresses of param, grad, exp_avg,
        exp_avg_sq, max_exp_avg_sq (0 without amsgrad) and step, then numel."""
        return [
            (p.data_ptr(), g.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr(),
             s["max_exp_avg_sq"].data_ptr() if "max_exp_avg_sq" in s else 0, s["step"].data_ptr(), p.numel())
            for p, g, s in items
        ]


def _prepare_state(state: dict, p: torch.Tensor, amsgrad: bool) -> None:
    """Create the state of ``p`` as torch.optim.Adam lays it out, or convert a loaded one: a
    float32 ``step`` on the parameter's device, moments in _state_dtype(p) laid out like ``p``."""
    dtype = _state_dtype(p)
    step = state.get("step")
    if not isinstance(step, torch.Tensor):
        state["step"] = torch.tensor(float(step or 0), dtype=torch.float32, device=p.device)
    elif step.dtype != torch.float32 or step.device != p.device or step.dim() != 0:
        state["step"] = step.detach().to(device=p.device, dtype=torch.float32).reshape(())
    for key in _MOMENTS if amsgrad else _MOMENTS[:2]:
        moment = state.get(key)
        if moment is None:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        elif moment.dtype != dtype or moment.device != p.device or moment.stride() != p.stride():
            state[key] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(moment)


class _CppPlan(_GroupPlan):
    """CPU tensors: csrc/adam.cpp, one call per dtype with the table in a host array."""

    backend = "cpu"

    def build(self, buckets):
        self.calls = []
        grad_slots = {}  # parameter -> (its table, the index of its gradient's address there)
        for dtype, items in buckets.items():
            table = array("q", chain.from_iterable(self.rows(items)))
            self.calls.append((cpp_dtype(items[0][0]), table, table.buffer_info()[0], len(items)))
            for row, (p, _, _) in enumerate(items):
                grad_slots[p] = (table, row * len(TABLE_FIELDS) + _GRAD_SLOT)
        self.grad_slots = [grad_slots[p] for p in self.params if p in grad_slots]

    def set_grad_addresses(self, grads, addresses):
        for (table, slot), address in zip(self.grad_slots, addresses):
            table[slot] = address

    def launch(self, group):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        adam_step = cpp().adam_step
        for dtype, _table, address, rows in self.calls:
            adam_step(dtype, address, rows, float(lr), float(beta1), float(beta2), group["eps"],
                      group["weight_decay"], group["decoupled_weight_decay"], self.amsgrad, group["maximize"],
                      num_threads())


class _TritonPlan(_GroupPlan):
    """CUDA tensors (or CPU tensors under TRITON_INTERPRET=1): kernels/triton/adam.py."""

    backend = "triton"

    def __init__(self, *args):
        super().__init__(*args)
        self.kernels = triton_op("adam")
        self.hyper: tuple | None = None
        self.bits: tuple = ()

    def build(self, buckets):
        self.tables = [self.kernels.AdamTable(self.rows(items), dtype, self.device) for dtype, items in buckets.items()]

    def launch(self, group):
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            if not group["capturable"]:
                raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of "
                                   f"{type(self.optimizer).__name__} but param_groups' capturable is False.")
            # The graph reads these tables at every replay: never let them be freed.
            kept = self.optimizer._graph_tables
            kept += [t for t in self.tables if not any(t is k for k in kept)]
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr_on_device = isinstance(lr, torch.Tensor) and lr.device == self.device
        if not lr_on_device:
            lr = float(lr)  # a float, or a tensor on the host: reading it does not synchronise
        hyper = (0.0 if lr_on_device else lr, float(beta1), float(beta2), float(eps), float(weight_decay))
        if hyper != self.hyper:
            self.bits = tuple(map(self.kernels.float_bits, hyper))
            self.hyper = hyper
        for table in self.tables:
            self.kernels.adam_step(table, lr, self.bits, weight_decay=weight_decay != 0,
                                   decoupled=group["decoupled_weight_decay"], amsgrad=self.amsgrad,
                                   maximize=group["maximize"])


class _TorchPlan(_GroupPlan):
    """Any other device (or KERNELS_BACKEND=torch): adam_reference."""

    backend = "torch"

    def build(self, buckets):
        self.items = [(p, s) for items in buckets.values() for p, _, s in items]

    def launch(self, group):
        beta1, beta2 = group["betas"]
        adam_reference([p for p, _ in self.items], [p.grad for p, _ in self.items], [s for _, s in self.items],
                       lr=group["lr"], beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                       weight_decay=group["weight_decay"], decoupled=group["decoupled_weight_decay"],
                       amsgrad=self.amsgrad, maximize=group["maximize"])


_PLANS = {plan.backend: plan for plan in (_CppPlan, _TritonPlan, _TorchPlan)}


# ------------------------------------------------------------------------------------------
# The optimizers


class FusedAdam(torch.optim.Optimizer):
    """torch.optim.Adam with one fused kernel launch per parameter group (see the module doc).

    Arguments are torch.optim.Adam's. ``foreach`` and ``differentiable`` must stay None/False
    (the step is always this library's fused kernel, outside autograd); ``fused`` is accepted
    and kept in the state_dict. ``capturable=True`` allows capturing ``step()`` in a CUDA graph;
    a float ``lr`` is then frozen into the graph, so schedule a tensor ``lr`` on the device
    (schedulers update it in place). Betas are read on the host at every step.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False):
        for flag, value in (("foreach", foreach), ("differentiable", differentiable)):
            if value:
                raise ValueError(f"{type(self).__name__} always runs its own fused kernel outside autograd: "
                                 f"{flag}=True is not supported (leave it None/False)")
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._plans: list[_GroupPlan | None] = []
        self._graph_tables: list = []  # Triton tables captured in CUDA graphs, kept alive
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            _check_params(type(self).__name__, len(self.param_groups) - 1, group["params"])
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
        self._plans = []
        self.__dict__.setdefault("_graph_tables", [])

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer.load_state_dict, then two fixes: tensors still shared with
        ``state_dict`` are copied (torch keeps them when device and dtype already match, and
        our kernels update states in place), and low-precision parameters take their float32
        moments from ``state_dict`` itself (torch has rounded them to the parameter dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            state, saved = self.state.get(p), state_dict["state"].get(saved_id)
            if not state or saved is None:
                continue
            shared = {t.data_ptr() for t in saved.values() if isinstance(t, torch.Tensor)}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.data_ptr() in shared:
                    state[key] = value.clone()
            if _state_dtype(p) != p.dtype:
                for key in _MOMENTS:
                    if isinstance(saved.get(key), torch.Tensor):
                        state[key] = saved[key].detach().to(device=p.device, dtype=_state_dtype(p), copy=True)

    def step(self, closure=None):
        """One Adam step for every parameter that has a gradient; returns ``closure()``'s loss.

        Step hooks and the profiler label work as in torch.optim; their wrapper (about 10 us)
        only runs when a hook is registered or the profiler is on."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks
                or torch.autograd._profiler_enabled()):
            return self._hooked_step(closure)
        return self._step(closure)

    step.hooked = True  # tells torch.optim.Optimizer not to wrap step (see _hooked_step)

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = self._plans
        for index, group in enumerate(self.param_groups):
            plan = plans[index] if index < len(plans) else None
            if (plan is None or plan.group is not group or plan.params is not group["params"]
                    or plan.num_params != len(plan.params) or plan.amsgrad != group["amsgrad"]):
                plan = self._plan(index, group)
            plan.step(group)
        return loss

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _plan(self, index: int, group: dict) -> _GroupPlan:
        _check_hyperparameters(group)
        plan = _PLANS[backend_for(group["params"][0])](self, index, group)
        self._plans.extend([None] * (index + 1 - len(self._plans)))
        self._plans[index] = plan
        return plan


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
