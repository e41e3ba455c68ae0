"""One call to put an existing PyTorch model and optimizer on this library's kernels.

``fuse(model)`` swaps modules in place and ``fuse_optimizer(optimizer)`` returns the fused
optimizer; the model's code (its classes, its ``forward``) stays as written::

    model = kernels.fuse(model)                  # nn.Linear (+ ReLU/Sigmoid/Tanh) -> FusedLinear
    criterion = kernels.fuse(criterion)          # nn.CrossEntropyLoss -> FusedCrossEntropyLoss
    optimizer = kernels.fuse_optimizer(optimizer)  # torch.optim.Adam/AdamW/SGD -> FusedAdam/AdamW/SGD

What ``fuse`` replaces, each only where its type is exactly the PyTorch class (a subclass may
compute something else in its ``forward``):

* inside an ``nn.Sequential`` (one whose ``forward`` is nn.Sequential's), an ``nn.Linear``
  directly followed by ``nn.ReLU``, ``nn.Sigmoid`` or ``nn.Tanh``: the Linear becomes one
  ``FusedLinear`` carrying that activation and the activation becomes ``Absorbed``, a
  placeholder that returns its input, so the Sequential keeps its length and indices
  (``model[2]`` is still the module it was);
* every other ``nn.Linear``: ``FusedLinear(activation="none")``, e.g. the ``fc1``/``fc2``/``fc3``
  attributes of a model whose ``forward`` applies ``F.relu`` itself (which stays as written);
* every ``nn.CrossEntropyLoss``: ``FusedCrossEntropyLoss`` with the same ``weight`` (the same
  tensor), ``ignore_index``, ``reduction`` and ``label_smoothing``. It takes what the module it
  replaces takes: class-index targets run the fused kernel, for (N, C), (C,) and (N, C, d1, ...)
  logits alike; targets of class probabilities run ``F.cross_entropy`` itself.

The replacements hold the very Parameter objects of the replaced modules (an optimizer built
before ``fuse`` keeps working) and have nn.Linear's parameter names, and the activations hold
no state, so the state_dict keys do not change at all: a state_dict saved before ``fuse``, or
by the plain PyTorch model, loads into the fused model, and the fused model's into the plain
one. Nothing is copied and no random numbers are drawn. Hooks registered on a replaced module
are not carried over; a hook on a FusedLinear that absorbed an activation sees the activated
output, and one on the ``Absorbed`` placeholder sees what one on the activation module saw. A
Linear whose parameters are not its own plain ``weight``/``bias`` (weight norm, spectral norm)
is left alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

import kernels

__all__ = ["Absorbed", "fuse", "fuse_optimizer"]

# The activation modules a FusedLinear can absorb, by exact type.
_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


@dataclass
class _Report:
    """What ``fuse`` did: (path, what was there, what is there now), and what it left alone and why."""

    model: str
    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        count = len(self.replaced)
        if not count:
            lines = [f"kernels.fuse({self.model}): nothing to replace"]
        else:
            lines = [f"kernels.fuse({self.model}): {count} replacement{'' if count == 1 else 's'} "
                     "(parameters and state_dict keys unchanged)"]
        width = max((len(path) for path, _, _ in self.replaced), default=0)
        lines += [f"  {path:<{width}}  {old}  ->  {new}" for path, old, new in self.replaced]
        lines += [f"  left alone: {path}: {why}" for path, why in self.left_alone]
        return "\n".join(lines)


class Absorbed(nn.Identity):
    """Where ``fuse`` took an activation module out of an nn.Sequential (the FusedLinear before it
    applies that activation now): returns its input, the activation's output, and keeps the
    Sequential's length, indices and state_dict keys. Until a forward or backward hook is
    registered on it, it is called without nn.Module's call machinery, which cost about 1 us a
    call, a tenth of what a layer of a tutorial's toy network costs on the CPU; from then on,
    through it, so its hooks run as they ran on the activation module (global module hooks,
    ``nn.modules.module.register_module_forward_hook``, do not run on it)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.hooked = False  # a hook was registered: calls go through nn.Module's machinery

    def __call__(self, input):
        return super().__call__(input) if self.hooked else input

    def extra_repr(self) -> str:
        return f"{self.activation}: applied by the FusedLinear before it"


def _registering(register):
    """nn.Module's ``register`` (a hook registration method), first switching the module's calls
    to nn.Module's machinery."""
    def register_hook(self, *args, **kwargs):
        self.hooked = True
        return register(self, *args, **kwargs)

    return functools.wraps(register)(register_hook)


for _name in ("register_forward_pre_hook", "register_forward_hook", "register_full_backward_pre_hook",
              "register_full_backward_hook", "register_backward_hook"):
    setattr(Absorbed, _name, _registering(getattr(nn.Module, _name)))


def _describe_linear(m: nn.Module) -> str:
    return f"Linear({m.in_features}, {m.out_features}{'' if m.bias is not None else ', bias=False'})"


def _linear_problem(m: nn.Module) -> str | None:
    """Why the nn.Linear-like module ``m`` cannot become a FusedLinear, or None if it can."""
    if type(m) is not nn.Linear:
        return f"{type(m).__name__}, a subclass of nn.Linear"
    own = {name for name, _ in m.named_parameters(recurse=False)}
    if own != ({"weight"} if m.bias is None else {"weight", "bias"}) or list(m.children()) or list(m.buffers()):
        return "its weight is not a plain parameter of its own (weight or spectral norm?)"
    return None


def _fused_linear(m: nn.Linear, activation: str) -> nn.Module:
    # Built on the meta device (no memory, no random draws), then given m's own parameters.
    new = kernels.FusedLinear(m.in_features, m.out_features, bias=m.bias is not None, activation=activation,
                              device="meta")
    new.weight = m.weight
    new.bias = m.bias
    return new.train(m.training)


def _fused_cross_entropy(m: nn.CrossEntropyLoss) -> nn.Module:
    new = kernels.FusedCrossEntropyLoss(weight=m.weight, ignore_index=m.ignore_index, reduction=m.reduction,
                                        label_smoothing=m.label_smoothing)
    return new.train(m.training)


def _path(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def fuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Puts ``model`` on this library's fused modules, in place, and returns it.

    See the module docstring for what is replaced and what stays the same (parameters, state_dict
    keys, Sequential indices). ``verbose=True`` prints one line per replacement (its path in the
    model, the old module and the new one) and the Linear-like modules left alone, with why.

    When ``model`` itself is an ``nn.Linear`` or ``nn.CrossEntropyLoss`` it has no parent to be
    replaced in, so the fused module is returned instead: always use the returned value, as in
    ``criterion = kernels.fuse(criterion)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kernels.fuse: expected an nn.Module, got {type(model).__name__}")
    report = _Report(type(model).__name__)
    # Every place a module sits (a module shared by two parents is listed under both), taken
    # before anything changes; children in registration order, which is a Sequential's order.
    places = dict(model.named_modules(remove_duplicate=False))
    children: dict[str, list[tuple[str, nn.Module]]] = {path: [] for path in places}
    for path, module in places.items():
        if path:
            parent, _, name = path.rpartition(".")
            children[parent].append((name, module))

    fused: dict[tuple[int, str], nn.Module] = {}  # one replacement per (module, activation): sharing is kept

    def replacement(module: nn.Module, activation: str) -> nn.Module:
        key = (id(module), activation)
        if key not in fused:
            fused[key] = _fused_linear(module, activation)
        return fused[key]

    def replace(parent: nn.Module, parent_path: str, swaps: dict[str, nn.Module], old: str, now: str) -> None:
        for name, new in swaps.items():
            setattr(parent, name, new)
        report.replaced.append((", ".join(_path(parent_path, name) for name in swaps), old, now))

    visited: set[int] = set()  # a module shared by two parents has its children replaced once
    for parent_path, parent in places.items():
        if id(parent) in visited:
            continue
        visited.add(id(parent))
        slots = children[parent_path]
        in_sequence = isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
        i = 0
        while i < len(slots):
            name, module = slots[i]
            taken = 1
            if isinstance(module, nn.Linear):
                problem = _linear_problem(module)
                act_name, act = slots[i + 1] if in_sequence and i + 1 < len(slots) else (None, None)
                activation = _ACTIVATIONS.get(type(act))
                if problem is not None:
                    report.left_alone.append((_path(parent_path, name), problem))
                elif activation is not None:
                    swaps = {name: replacement(module, activation), act_name: Absorbed(activation)}
                    replace(parent, parent_path, swaps,
                            f"{_describe_linear(module)}, {type(act).__name__}",
                            f"FusedLinear(activation={activation!r}), Absorbed")
                    taken = 2
                else:
                    replace(parent, parent_path, {name: replacement(module, "none")}, _describe_linear(module),
                            "FusedLinear(activation='none')")
            elif type(module) is nn.CrossEntropyLoss:
                replace(parent, parent_path, {name: _fused_cross_entropy(module)}, "CrossEntropyLoss",
                        "FusedCrossEntropyLoss")
            i += taken
    order = {path: i for i, path in enumerate(places)}
    report.replaced.sort(key=lambda entry: order[entry[0].split(", ")[0]])

    result = model  # the model itself has no parent to be replaced in: the replacement is returned
    itself = "(the model itself)"
    if isinstance(model, nn.Linear):
        problem = _linear_problem(model)
        if problem is not None:
            report.left_alone.append((itself, problem))
        else:
            result = replacement(model, "none")
            report.replaced.append((itself, _describe_linear(model), "FusedLinear(activation='none')"))
    elif type(model) is nn.CrossEntropyLoss:
        result = _fused_cross_entropy(model)
        report.replaced.append((itself, "CrossEntropyLoss", "FusedCrossEntropyLoss"))
    if verbose:
        print(report)
    return result


def _counterparts() -> dict[type, type]:
    # AdamW subclasses Adam in torch: classes are matched exactly, never through isinstance.
    return {torch.optim.Adam: kernels.FusedAdam, torch.optim.AdamW: kernels.FusedAdamW,
            torch.optim.SGD: kernels.FusedSGD}


def fuse_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The fused counterpart of a ``torch.optim.Adam``, ``AdamW`` or ``SGD``: ``FusedAdam``,
    ``FusedAdamW`` or ``FusedSGD`` over the same Parameter objects, with the same parameter
    groups, hyper-parameters (also any a scheduler added, such as ``initial_lr``), defaults for
    later ``add_param_group`` calls, and a copy of its state (step counts, moments, momentum
    buffers), so training goes on exactly where ``optimizer`` was. ``optimizer`` itself is left
    as it was. An optimizer that already is one of ours is returned as it is.

    ``foreach`` is dropped (the fused step has a single implementation); ``differentiable=True``
    raises ValueError (the fused step runs outside autograd), and so does any option the fused
    class does not have that is switched on. Any other class raises TypeError. LR schedulers and
    hooks attached to ``optimizer`` stay with it: create them on the returned optimizer.
    """
    ours = tuple(set(_counterparts().values()))
    if isinstance(optimizer, ours):
        return optimizer
    counterpart = _counterparts().get(type(optimizer))
    if counterpart is None:
        kind = type(optimizer)
        raise TypeError(f"kernels.fuse_optimizer: no fused counterpart of {kind.__module__}.{kind.__qualname__}; "
                        "it converts torch.optim.Adam, torch.optim.AdamW and torch.optim.SGD (exactly these "
                        "classes: a subclass may change the update)")
    name = f"kernels.fuse_optimizer({type(optimizer).__name__})"
    saved = optimizer.state_dict()
    for where, settings in [("the defaults", optimizer.defaults)] + [
            (f"parameter group {i}", g) for i, g in enumerate(saved["param_groups"])]:
        if settings.get("differentiable"):
            raise ValueError(f"{name}: {where} have differentiable=True, but the fused step runs outside autograd; "
                             "keep the torch optimizer to differentiate through its step")
    groups = [{**g, "foreach": None} for g in saved["param_groups"]]
    new = counterpart([{**g, "params": live["params"]} for g, live in zip(groups, optimizer.param_groups)])
    for where, settings in [("the defaults", optimizer.defaults)] + [
            (f"parameter group {i}", g) for i, g in enumerate(groups)]:
        unknown = [k for k in optimizer.defaults if k not in new.defaults and settings.get(k)]
        if unknown:
            raise ValueError(f"{name}: {where} set {', '.join(f'{k}={settings[k]!r}' for k in unknown)}, "
                             f"which {counterpart.__name__} does not support")
    new.defaults.update({k: None if k == "foreach" else v for k, v in optimizer.defaults.items() if k in new.defaults})
    state = {pid: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for pid, s in saved["state"].items()}
    new.load_state_dict({"state": state, "param_groups": groups})
    return new
