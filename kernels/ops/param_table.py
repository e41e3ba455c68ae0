"""What FusedAdam and FusedSGD share: the table of tensors that a parameter group's step walks,
when that table is rebuilt, and the optimizer base class that keeps the tables and launches.

A fused step updates all the tensors of a parameter group with one kernel launch per parameter
dtype. The launch reads a *table*: one row of int64 fields per parameter that has a gradient, in
the order of the optimizer's layout (``ADAM_LAYOUT``, ``SGD_LAYOUT``): addresses of the parameter,
its gradient and its state tensors (0 for an absent one), flags, and last its number of elements.
The layouts are defined here only: kernels/triton/<op>.py reads fields by their positions here,
csrc/<op>.cpp restates them as an enum and exports the names, which the tests compare. Complex
parameters, their gradients and states enter as their ``torch.view_as_real`` views, which is how
torch.optim updates them.

When a table is rebuilt (the invalidation rule). A group's table is reused while all of these
hold, which the step checks before every launch (csrc/param_table.cpp's TableGuard: under half a
microsecond per parameter):

* the group is the same dict with the same ``params`` list, of the same length, and the options
  that shape its rows (``row_options``, e.g. amsgrad) are as true or false as they were;
* ``optimizer.state`` is the same mapping, each parameter's state is the same dict, and every
  state tensor in the table is still the tensor object stored under its key;
* every parameter has the address and shape it had, and the same parameters have gradients;
* every gradient is the same tensor object at the same address.

When only gradients changed (new tensors, as after ``zero_grad(set_to_none=True)``), the rows
take the new gradients (states kept: ``table_builds`` counts it; a CPU table has the addresses
written into it in place, any other is made again); otherwise the whole table is rebuilt:
missing states are created as torch.optim creates them, present ones are checked against their
parameter (a state of another shape raises, as torch.optim does when it reaches it). The table
keeps a reference to every tensor it points to (a detached alias, which keeps the storage alive
whatever is done to the Python object), so each address in it is alive and of the size it was
checked for.

Where a group's step is one C++ launch (CPU tensors of one dtype, no gradient to copy, no first
momentum step to clear), the guard runs it too (``TableGuard.launch``): the check, new gradients'
addresses written into the rows and the launch in one call from Python, which is what a small
model's training loop pays for at every step. Anything else it leaves to ``FusedOptimizer.step``.

Under CUDA graph capture no table may be built (it would copy rows to the device, and the graph
must replay with the addresses it captured): a change there raises an error saying what changed.
A gradient whose strides differ from its parameter's (a transposed or expanded ``.grad``) is
copied, before every launch, into a buffer laid out like the parameter.
"""
from __future__ import annotations

from itertools import chain
from typing import NamedTuple

import torch

from kernels._dispatch import SUPPORTED_DTYPES, backend_for, dtype_names, implementation
from kernels.cpu import extension, num_threads

# The fields of one table row, per optimizer (see the module docstring). "numel" is always last:
# the C++ walker (csrc/param_table.h) reads it there.
ADAM_LAYOUT = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "numel")
# first_step: 1 until the tensor's first momentum step (which sets the buffer to the gradient, as
# torch.optim.SGD's clone does); the kernel that runs that step clears it in its own copy.
SGD_LAYOUT = ("param", "grad", "momentum_buffer", "first_step", "numel")

CURRENT, GRADIENTS, STALE = range(3)  # what GroupTable.changes finds


class Entry(NamedTuple):
    """One row of a table: its fields in layout order, and its tensors by field name (real views),
    for the backends that take tensors rather than addresses."""

    row: tuple[int, ...]
    tensors: dict[str, torch.Tensor]


def real(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the real tensor the kernels update: its view_as_real view if it is complex."""
    return torch.view_as_real(t.detach()) if t.is_complex() else t


def real_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype.to_real() if t.is_complex() else t.dtype


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of a parameter's state tensors: float32 for bfloat16/float16 parameters, the
    parameter's own otherwise."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


def dense(t: torch.Tensor) -> bool:
    """Whether the elements of ``t`` fill numel consecutive slots in some dimension order
    (contiguous, channels-last, transposed, ...): then an elementwise update can walk its memory flat."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def group_backend(params: list) -> str:
    """The backend of a group's step: the one its parameters' device and dtypes choose
    (``backend_for``), "torch" for the whole group where any of them goes there (a bfloat16
    parameter on the CPU)."""
    device = params[0].device if params else torch.device("cpu")
    backends = {backend_for(device, real_dtype(p)) for p in params} or {backend_for(device)}
    return "torch" if "torch" in backends else backends.pop()


def check_params(name: str, index: int, params: list, *, what: str) -> None:
    """One device per group, floating (or complex) dtypes the group's backend computes in, dense
    storage. ``what`` names the optimizer's kind ("Adam") in messages."""
    if not params:
        return
    device = params[0].device
    backend = group_backend(params)
    for i, p in enumerate(params):
        where = f"{name}: parameter {i} of group {index}"
        if p.device != device:
            raise ValueError(f"{where} is on {p.device} but parameter 0 is on {device}; "
                             "put the parameters of each device in their own parameter group")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"{where} has dtype {p.dtype}; {what} optimizes floating-point (or complex) parameters only")
        if backend in SUPPORTED_DTYPES and real_dtype(p) not in SUPPORTED_DTYPES[backend]:
            raise TypeError(f"{where} has dtype {p.dtype}; the {backend} backend supports {dtype_names(backend)} "
                            "(and the complex dtypes made of them)")
        if p.layout != torch.strided or not dense(p):
            raise ValueError(f"{where} must be a dense tensor without gaps or overlaps "
                             f"(shape {tuple(p.shape)}, strides {p.stride()})")


def check_state_shape(where: str, key: str, value: torch.Tensor, param: torch.Tensor) -> None:
    """torch.optim fails on a state tensor of another shape than its parameter (a state_dict saved
    for another model, a parameter replaced through ``.data``): so do we, before any kernel runs."""
    if value.shape != param.shape:
        raise RuntimeError(
            f"{where}: its state {key!r} has shape {tuple(value.shape)} but the parameter has shape "
            f"{tuple(param.shape)} (torch.optim fails here too: the size of tensor a ({value.numel()}) must "
            f"match the size of tensor b ({param.numel()})). Load a state_dict saved for these parameters, "
            "or clear the parameter's state (optimizer.state[p].clear()) to start it afresh")


def _alias(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class _Slot:
    """What a table knows of one parameter of its group. The gradient in its row is the guard's
    to hold (``TableGuard.gradients``), which may put a new one there itself (``TableGuard.launch``)."""

    __slots__ = ("param", "has_row", "address", "shape", "state", "tensors", "fields", "keep", "entry", "grad_form",
                 "row_head", "row_tail")

    def __init__(self, param: torch.Tensor):
        self.param = param
        self.has_row = False  # whether the parameter had a gradient when the table was built
        self.entry = None  # its row as last made (None: not kept, or to be made again)

    def with_gradient(self, g: torch.Tensor, address: int) -> Entry:
        """The row as last made with gradient ``g`` (a real tensor laid out like the parameter, at
        ``address``) in place of the one it was made with: only its address and tensor change."""
        return Entry(self.row_head + (address,) + self.row_tail, {**self.entry.tensors, "grad": g})


class GroupTable:
    """The tables of one parameter group: one backend table per parameter dtype, built by the
    backend's ``table(entries, device)`` (kernels/{cpu,triton,reference}/<op>.py)."""

    def __init__(self, optimizer: FusedOptimizer, index: int, group: dict):
        name = type(optimizer).__name__
        optimizer.check_hyperparameters(group)
        self.group, self.params, self.num_params = group, group["params"], len(group["params"])
        self.op = optimizer.op
        self.option_keys = optimizer.row_options
        self.options = self.options_of(group)
        self.layout = optimizer.layout
        self.grad_field = self.layout.index("grad")  # where a row holds its gradient's address
        self.state = optimizer.state
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.backend = group_backend(self.params)
        self.implementation = implementation(optimizer.op, self.backend)
        self.set_gradients = getattr(self.implementation, "set_gradients", None)
        self.cuda = self.device.type == "cuda"
        self.slots: list[_Slot] = []
        grads = []  # of the rows
        for i, p in enumerate(self.params):
            slot = _Slot(p)
            self.slots.append(slot)
            if p.grad is None:
                continue
            where = f"{name}: parameter {i} of group {index}"
            if p.device != self.device or (self.backend in SUPPORTED_DTYPES
                                           and real_dtype(p) not in SUPPORTED_DTYPES[self.backend]):
                raise ValueError(f"{where} became a {p.dtype} tensor on {p.device} after the first step on "
                                 f"{self.device}; create the optimizer after moving or casting the model")
            fields = optimizer.prepare_state(optimizer.state, p, group, where)
            slot.has_row, slot.address, slot.shape = True, p.data_ptr(), p.shape
            slot.state = optimizer.state.get(p)
            slot.tensors = tuple((key, slot.state[key]) for key, value in fields.items()
                                 if isinstance(value, torch.Tensor))
            slot.fields = fields
            slot.keep = [_alias(p)] + [_alias(t) for _, t in slot.tensors]
            grads.append(self._checked_grad(p, p.grad, where))
        self.row_slots = [s for s in self.slots if s.has_row]
        self._make_rows(grads)
        optimizer._builds += 1

    def changes(self, optimizer: FusedOptimizer, group: dict) -> tuple[int, str]:
        """(CURRENT, "") if the tables still describe the group; else GRADIENTS (only gradients
        changed) or STALE, and what changed first, in words."""
        if group is not self.group or group["params"] is not self.params or len(self.params) != self.num_params:
            return STALE, "the parameter group was replaced or its parameters changed"
        options = self.options_of(group)
        if options != self.options:
            key = next(k for k, was, now in zip(self.option_keys, self.options, options) if was != now)
            return STALE, f"the group's {key} is now {group[key]!r}, which changes what the table rows hold"
        if optimizer.state is not self.state:
            return STALE, "optimizer.state was replaced"
        status, change = CURRENT, ""
        states = self.state
        grads, addresses = self.guard.gradients()  # in the rows
        row = -1
        for i, s in enumerate(self.slots):
            p = s.param
            g = p.grad
            if not s.has_row:
                if g is not None:
                    return STALE, f"parameter {i} has a gradient now and had none"
                continue
            row += 1
            if g is None:
                return STALE, f"the gradient of parameter {i} became None"
            if p.data_ptr() != s.address or p.shape != s.shape:
                return STALE, f"parameter {i} moved to address {p.data_ptr():#x} (shape {tuple(p.shape)})"
            state = s.state
            if states.get(p) is not state:
                return STALE, f"the state of parameter {i} was replaced"
            for key, t in s.tensors:
                if state.get(key) is not t:
                    return STALE, f"the state {key!r} of parameter {i} was replaced or cleared"
            if status == CURRENT and g is not grads[row]:  # (a sparse one has no data_ptr())
                status, change = GRADIENTS, (f"the gradient of parameter {i} is a new tensor (the table's is "
                                             f"at {addresses[row]:#x})")
            elif status == CURRENT and g.data_ptr() != addresses[row]:
                status, change = GRADIENTS, (f"the gradient of parameter {i} moved to address {g.data_ptr():#x} "
                                             f"(was {addresses[row]:#x})")
        return status, change

    def update_gradients(self, optimizer: FusedOptimizer, index: int, held: bool) -> None:
        """Makes the rows again for new gradient tensors (after the guard or ``changes`` found
        GRADIENTS): each row as it was, with its new gradient. ``held``: the guard found them,
        each of its row's form, and holds them for ``_swap_gradients``."""
        if not (held and self._swap_gradients()):
            name = type(optimizer).__name__
            grads = [self._checked_grad(slot.param, slot.param.grad, lambda: f"{name}: parameter {i} of group {index}")
                     for i, slot in enumerate(self.slots) if slot.has_row]
            self._make_rows(grads, gradients_only=True)
        optimizer._builds += 1

    def _swap_gradients(self) -> bool:
        """update_gradients in its common case (every step of a ``zero_grad(set_to_none=True)``
        loop, where the guard does not launch the step itself): the guard found the new gradients
        each of its row's form (``grad_form``: the parameter's dtype, layout, shape, strides and
        device, and a real parameter), so only the gradient addresses of the rows change. A
        backend whose table is host memory read at each launch (the CPU's) has them written into
        it in place (``set_gradients``); any other gets its tables made again from each row as
        last made. False (nothing done) where the rows need more (gradients copied into the
        parameter's layout, first momentum steps to clear, a row not made yet), which the general
        path handles."""
        in_place = self.set_gradients is not None
        if self.grad_copies or self.first_steps or (not in_place and any(s.entry is None for s in self.row_slots)):
            return False
        grads, addresses = self.guard.accept_gradients()
        if in_place:
            for table, positions in zip(self.tables, self.table_positions):
                self.set_gradients(table, self.grad_field,
                                   addresses if positions is None else [addresses[i] for i in positions])
        else:
            for slot, g, address in zip(self.row_slots, grads, addresses):
                slot.entry = slot.with_gradient(g, address)
            self.tables = [self.implementation.table([slot.entry for slot in slots], self.device)
                           for slots in self.table_slots]
        return True

    @classmethod
    def _checked_grad(cls, p: torch.Tensor, g: torch.Tensor, where) -> torch.Tensor:
        """``g``, checked as the gradient of parameter ``p``; ``where`` (a string, or a function
        making it) names the parameter in errors."""
        if g.is_sparse or g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
            cls._bad_grad(g, p, where if isinstance(where, str) else where())
        return g

    @staticmethod
    def _bad_grad(g: torch.Tensor, p: torch.Tensor, where: str) -> None:
        if g.is_sparse:
            raise RuntimeError(f"{where.split(':')[0]} does not support sparse gradients (the gradient of "
                               f"{where.split(': ')[1]} is sparse)")
        raise ValueError(f"{where}: its gradient is a {g.dtype} tensor of shape {tuple(g.shape)} on {g.device}; "
                         f"the parameter is {p.dtype}, {tuple(p.shape)} on {p.device}")

    def _make_rows(self, grads: list[torch.Tensor], gradients_only: bool = False) -> None:
        """The backend tables, one per parameter dtype, from the rows' gradients ``grads`` (with
        ``gradients_only``, from each slot's previous entry, where it has one, with only its
        gradient replaced). Where the backend writes new gradients into its table in place (the
        CPU's), the entries are not kept: they would keep the table's old gradients alive."""
        buckets: dict[torch.dtype, list[_Slot]] = {}
        positions: dict[torch.dtype, list[int]] = {}  # where each bucket's slots are among all the rows
        self.grad_copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, gradient): copied before each launch
        self.first_steps = False
        layout = self.layout
        row = 0
        for slot, grad in zip(self.row_slots, grads):
            g, p = grad, slot.param
            if not laid_out_alike(p, g):
                buffer = torch.empty_like(p, memory_format=torch.preserve_format)
                self.grad_copies.append((buffer, g))
                g = buffer
            if gradients_only and slot.entry is not None:
                g = real(g)
                slot.entry = entry = slot.with_gradient(g, g.data_ptr())
            else:
                slot.entry = entry = make_entry(layout, p, g, slot.fields)
            # what a new gradient must match for its address to take this row's (the guard checks it)
            slot.grad_form = None if p.is_complex() or g is not grad else grad_form(p)
            slot.row_head, slot.row_tail = entry.row[:self.grad_field], entry.row[self.grad_field + 1:]
            self.first_steps |= bool(slot.fields.get("first_step"))
            dtype = entry.tensors["param"].dtype
            positions.setdefault(dtype, []).append(row)
            buckets.setdefault(dtype, []).append(slot)
            row += 1
        self.table_slots = list(buckets.values())  # the slots of each table's rows, in order
        # where each table's rows are among all the rows (None: one table has them all, in order)
        self.table_positions = [None] if len(buckets) == 1 else list(positions.values())
        self.tables = [self.implementation.table([slot.entry for slot in slots], self.device)
                       for slots in self.table_slots]
        if self.set_gradients is not None:
            for slot in self.row_slots:
                slot.entry = None
        self._remember(grads, gradients_only)
        self._set_launch()

    def _set_launch(self) -> None:
        """Whether the group's step is one C++ launch (``one_cpu_launch``: the CPU backend, one
        table, no gradient to copy first; what C++ code can run itself, here and in
        ``native_update``), and whether the guard runs it after finding the table current
        (``launches``; FusedOptimizer.step): where it is one, with no first momentum step for the
        slots to see cleared. In one call, the MNIST MLP's SGD step (the kernel 10.5 us, the check
        2.9) has 1.6 us of Python around it, where a check and a launch made from Python had 3.6
        (Zen 3)."""
        self.one_cpu_launch = self.backend == "cpu" and len(self.tables) == 1 and not self.grad_copies
        self.launches = self.one_cpu_launch and not self.first_steps
        if self.launches:
            table = self.tables[0]
            self.guard.set_launch(self.op, table.dtype, table.address, table.count, self.grad_field, len(self.layout),
                                  num_threads)
        else:
            self.guard.set_launch("", "", 0, 0, 0, 0, None)

    def _remember(self, grads: list[torch.Tensor], gradients_only: bool = False) -> None:
        """What the step checks first (csrc/param_table.cpp's TableGuard): the group, its params
        list and length, and the truth of its ``row_options``; per parameter with a row, its
        object, address, shape and gradient (object and address), and the form a new gradient
        must have to take the row's place (``grad_form``); optimizer.state's entries; the
        state tensors in the table with their state dicts and keys; and the parameters without a
        row. The guard holds the gradients in the rows (and keeps them alive)."""
        rows = self.row_slots
        grad_addresses = [g.data_ptr() for g in grads]
        forms = [s.grad_form for s in rows]
        if gradients_only:
            self.guard.set_gradients(grads, grad_addresses, forms)
            return
        self.guard = extension().TableGuard(
            self.group, list(self.option_keys), list(self.options), [s.param for s in rows], [s.address for s in rows],
            [s.shape for s in rows], grads, grad_addresses, forms, self.state,
            [s.state for s in rows for _ in s.tensors], [key for s in rows for key, _ in s.tensors],
            [t for s in rows for _, t in s.tensors], [s.param for s in self.slots if not s.has_row])

    def remember_states(self) -> None:
        """Has the guard take optimizer.state's entries again, as they are now, when states of
        other groups' parameters came or went since (``changes`` found the table current):
        compared object by object, in order, they stand for "every parameter's state is the dict
        it was" without hashing a parameter."""
        self.guard.remember_states()

    def options_of(self, group: dict) -> tuple[bool, ...]:
        """The truth of the group's options that shape its rows (the optimizer's ``row_options``)."""
        return tuple(bool(group[key]) for key in self.option_keys)

    def launched(self) -> None:
        """After a launch: the kernels have cleared their first_step flags; so do the slots."""
        if self.first_steps:
            for slot in self.row_slots:
                if slot.fields.get("first_step"):
                    slot.fields["first_step"] = 0
                    slot.entry = None  # its row still says first step
            self.first_steps = False
            self._set_launch()


class FusedOptimizer(torch.optim.Optimizer):
    """The step every fused optimizer shares: per group, check the group's table (GroupTable),
    rebuild it when it no longer describes the group, and launch the op's kernel on it.

    Subclasses set ``op`` (the kernels._dispatch op name), ``layout``, ``state_keys`` and
    ``row_options``, and define ``check_hyperparameters``, ``prepare_state``, ``hyperparameters``
    (a group's arguments of the backend's ``step`` after the table) and ``compiled_launch``.
    ``table_builds`` counts the tables built (in full, or with new gradients in their rows) since
    the optimizer was created: a training loop that keeps its gradients in place builds one per
    group, once.
    """

    op = ""
    layout: tuple[str, ...] = ()  # ADAM_LAYOUT or SGD_LAYOUT
    state_keys: tuple[str, ...] = ()  # state tensors kept in float32 for low-precision parameters
    # The group options whose truth decides what a table row holds (a rebuild when one flips).
    row_options: tuple[str, ...] = ()
    # What a group saved by an older torch (or by the torch class) lacks, filled in on loading.
    group_defaults: dict = {}

    def __init__(self, params, defaults: dict):
        for flag in ("foreach", "differentiable"):
            if defaults.get(flag):
                raise ValueError(f"{type(self).__name__} always runs its own fused kernel outside autograd: "
                                 f"{flag}=True is not supported (leave it None/False)")
        self._tables: dict[int, GroupTable] = {}
        self._graph_tables: list = []  # tables captured in CUDA graphs: kept alive for the replays
        self._builds = 0  # tables made in Python (table_builds adds the guards' gradient swaps)
        super().__init__(params, defaults)

    @property
    def table_builds(self) -> int:
        return self._builds + sum(table.guard.gradient_swaps for table in self._tables.values())

    # -- to define in each optimizer
    def check_hyperparameters(self, group: dict) -> None:
        raise NotImplementedError

    def prepare_state(self, states, p: torch.Tensor, group: dict, where: str) -> dict:
        """Create or check the state of ``p`` (in ``states``, the optimizer's state mapping) and
        return the values of the layout's state fields: tensors, ints (flags) or None (absent)."""
        raise NotImplementedError

    def hyperparameters(self, group: dict) -> tuple:
        """The arguments of the backend's ``step(table, *arguments)`` for ``group``, in order."""
        raise NotImplementedError

    def compiled_launch(self, group: dict, params: list, fields: list[dict], backend: str) -> None:
        raise NotImplementedError

    # -- shared
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.check_hyperparameters(group)
            check_params(type(self).__name__, len(self.param_groups) - 1, group["params"], what=self.op_title)
        except Exception:
            self.param_groups.pop()
            raise

    @property
    def op_title(self) -> str:
        return "SGD" if self.op == "sgd" else self.op.capitalize()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.group_defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_graph_tables", [])
        self.__dict__.setdefault("_builds", 0)
        self._tables = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim.Optimizer.load_state_dict, then two fixes: tensors still shared with
        ``state_dict`` are copied (torch keeps them when device and dtype already match, and the
        kernels update states in place), and low-precision parameters take their float32 states
        from ``state_dict`` itself (torch has rounded them to the parameter dtype)."""
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
            if state_dtype(p) != p.dtype:
                for key in self.state_keys:
                    if isinstance(saved.get(key), torch.Tensor):
                        state[key] = saved[key].detach().to(device=p.device, dtype=state_dtype(p), copy=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim.Optimizer.zero_grad. With ``set_to_none`` (the default) the gradients are
        set to None here, without the profiler range that torch's wraps around that loop: its
        ``record_function`` costs 8-11 us a call when no profiler runs, ten times the loop over a
        small model's parameters (3 % of a step of the toy 1-2-1 tutorial network). Zeroing in
        place (``set_to_none=False``) and a traced call are torch's own."""
        if not set_to_none or torch.compiler.is_compiling():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    def step(self, closure=None):
        """One step for every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._compiled_step()
            return loss
        for index, group in enumerate(self.param_groups):
            table, status = self._tables.get(index), None
            if table is not None and table.launches:  # the guard checks (new gradients taken) and steps
                status = table.guard.launch(group, self.state, self.hyperparameters(group))
                if status == CURRENT:
                    continue
            table = self._table(index, group, status)
            if table.grad_copies:
                with torch.no_grad():
                    for buffer, grad in table.grad_copies:
                        buffer.copy_(grad)
            arguments = self.hyperparameters(group)
            for backend_table in table.tables:
                table.implementation.step(backend_table, *arguments)
            table.launched()
        return loss

    def native_update(self) -> tuple[GroupTable, tuple] | None:
        """This optimizer's next step as one launch that C++ code runs itself (kernels.MLPStep
        runs it right after its backward): after the table checks and rebuilds of ``step()``,
        (table, (op, table address, rows, arguments)), with the arguments of the backend's step
        after its table (``hyperparameters``); call ``table.launched()`` once it ran. None where a
        step is more than one C++ launch (several groups or dtypes, gradients to copy first,
        tensors not on the CPU): then call ``step()``."""
        if len(self.param_groups) != 1 or torch.compiler.is_compiling():
            return None
        group = self.param_groups[0]
        table = self._table(0, group)
        if not table.one_cpu_launch:
            return None
        backend_table = table.tables[0]
        return table, (self.op, backend_table.address, backend_table.count, self.hyperparameters(group))

    def _table(self, index: int, group: dict, status: int | None = None) -> GroupTable:
        """The group's table, checked (unless ``status`` is what its guard just found) and, where
        it no longer describes the group, rebuilt (or its rows made again for new gradients);
        under CUDA graph capture a rebuild raises."""
        table = self._tables.get(index)
        held = False  # whether the guard holds the new gradients it found
        if table is None:
            status, change = STALE, "there was no table yet"
            params = group["params"]
            capturing = bool(params) and params[0].is_cuda and torch.cuda.is_current_stream_capturing()
        else:
            if status is None:  # CURRENT, GRADIENTS, or another code: look closer
                status = table.guard.status(group, self.state)
            if status == CURRENT and not table.cuda:
                return table  # every step of a CPU loop that keeps its tensors (and nothing to capture)
            capturing = table.cuda and torch.cuda.is_current_stream_capturing()
            held = status == GRADIENTS
            if status not in (CURRENT, GRADIENTS) or (capturing and status != CURRENT):  # what changed, in words
                held = False
                status, change = table.changes(self, group)
                if status == CURRENT:  # only the states of other groups' parameters came or went
                    table.remember_states()
        if status != CURRENT:
            if capturing:
                raise RuntimeError(
                    f"{type(self).__name__}: the tensor table of parameter group {index} would be rebuilt "
                    f"during CUDA graph capture because {change}. A captured step must find every parameter, "
                    "gradient and state where the eager steps before it left them: run at least one eager "
                    "step before capturing, and keep gradients at fixed addresses (zero them in place with "
                    "zero_grad(set_to_none=False), or use one flat gradient buffer as ffnn/step.py does)")
            if status == STALE:
                if table is not None:
                    self._builds += table.guard.gradient_swaps
                table = self._tables[index] = GroupTable(self, index, group)
            else:
                table.update_gradients(self, index, held)
        if capturing:
            if not group.get("capturable", False):
                raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of "
                                   f"{type(self).__name__} but param_groups' capturable is False.")
            kept = self._graph_tables
            kept += [t for t in table.tables if not any(t is k for k in kept)]
        return table

    def _compiled_step(self) -> None:
        """The step as torch.compile traces it: states created in traced code, then one custom op
        per group (``torch.ops.kernels.<op>_step``) that builds its table and launches."""
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            name = type(self).__name__
            fields = [self.prepare_state(self.state, p, group, f"{name}: a parameter of group {index}")
                      for p in params]
            self.compiled_launch(group, params, fields, group_backend(params))


def make_entry(layout: tuple[str, ...], param: torch.Tensor, grad: torch.Tensor, fields: dict) -> Entry:
    """The table row of ``param`` with gradient ``grad`` (laid out like it) and the state field
    values ``fields`` (from prepare_state)."""
    tensors = {"param": real(param), "grad": real(grad)}
    for key, value in fields.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = real(value) if value.dim() else value
    row = tuple(tensors["param"].numel() if field == "numel"
                else tensors[field].data_ptr() if field in tensors
                else int(fields.get(field) or 0)
                for field in layout)
    return Entry(row, tensors)


def grad_form(param: torch.Tensor) -> tuple:
    """What a new gradient of ``param`` must match to take the place of the one in its table row
    (csrc/param_table.cpp's TableGuard reads the same five properties of the gradient): dtype,
    layout, shape, strides and device index."""
    return param.dtype, param.layout, param.shape, param.stride(), param.get_device()


def laid_out_alike(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the kernels can walk ``grad`` flat beside ``param`` (same strides, or both contiguous)."""
    return grad.stride() == param.stride() or (grad.is_contiguous() and param.is_contiguous())


def entries_by_dtype(layout: tuple[str, ...], params: list, grads: list, fields: list[dict]) -> dict[torch.dtype, list[Entry]]:
    """The entries of tables made on the spot (the compiled step's custom ops), by dtype; a
    gradient laid out unlike its parameter is copied into the parameter's layout first."""
    buckets: dict[torch.dtype, list[Entry]] = {}
    for p, g, f in zip(params, grads, fields):
        if not laid_out_alike(p, g):
            g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
        entry = make_entry(layout, p, g, f)
        buckets.setdefault(entry.tensors["param"].dtype, []).append(entry)
    return buckets
