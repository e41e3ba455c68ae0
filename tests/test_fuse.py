"""kernels.fuse and kernels.fuse_optimizer against the plain PyTorch models and optimizers they convert.

The models are the tutorial systems' own (examples/), plus the odd cases fuse must leave alone."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from examples import mnist_mlp, mnist_mlp_sgd, mnist_nll, regression, toy_sigmoid


def _one_layer():
    return nn.Linear(784, 10)


# name: (model factory, input shape, loss, optimizer factory, the fused layers' activations after fuse)
TUTORIAL_MODELS = {
    "one_layer": (_one_layer, (6, 784), F.cross_entropy, lambda p: torch.optim.Adam(p, lr=1e-3), ["none"]),
    "toy_sigmoid": (toy_sigmoid.build_model, (1, 1), F.mse_loss, lambda p: torch.optim.SGD(p, lr=0.5),
                    ["sigmoid", "sigmoid"]),
    "regression": (regression.Net, (16, 3), F.mse_loss, lambda p: torch.optim.SGD(p, lr=0.01), ["none", "none"]),
    "mnist_mlp": (mnist_mlp.NeuralNetwork, (6, 1, 28, 28), F.cross_entropy, lambda p: torch.optim.Adam(p, lr=1e-3),
                  ["none", "none", "none"]),
    "mnist_mlp_sgd": (mnist_mlp_sgd.NeuralNetwork, (6, 1, 28, 28), F.cross_entropy,
                      lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), ["relu", "relu", "none"]),
    "mnist_nll": (mnist_nll.build_model, (6, 784), F.nll_loss, lambda p: torch.optim.Adam(p, lr=3e-3),
                  ["relu", "relu", "none"]),
}


def _target(loss, x, out_features):
    if loss is F.mse_loss:
        return torch.randn(x.shape[0], out_features)
    return torch.randint(0, out_features, (x.shape[0],))


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, kernels.FusedLinear)]


@pytest.mark.parametrize("name", TUTORIAL_MODELS)
def test_fused_tutorial_model_computes_what_it_did(name, backend):
    make, shape, loss_fn, _, activations = TUTORIAL_MODELS[name]
    plain = make()
    model = copy.deepcopy(plain)
    params = list(model.parameters())
    keys = list(model.state_dict())
    rng = torch.get_rng_state()
    fused = kernels.fuse(model)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing was initialised
    assert [m.activation for m in _fused_layers(fused)] == activations
    assert not any(type(m) is nn.Linear for m in fused.modules())
    assert all(a is b for a, b in zip(fused.parameters(), params)) and len(list(fused.parameters())) == len(params)
    assert list(fused.state_dict()) == keys

    x = torch.randn(shape, device=backend.device)
    plain, fused = plain.to(backend.device), fused.to(backend.device)
    out_plain, out_fused = plain(x), fused(x)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-5)
    target = _target(loss_fn, x, out_plain.shape[-1]).to(backend.device)
    loss_fn(out_plain, target).backward()
    loss_fn(out_fused, target).backward()
    for (key, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {key}.grad: {m}")


@pytest.mark.parametrize("name", TUTORIAL_MODELS)
def test_training_the_fused_tutorial_system_matches_pytorch(name):
    """Model, loss and optimizer converted after two plain steps; five more steps match plain PyTorch's."""
    make, shape, loss_fn, make_optimizer, _ = TUTORIAL_MODELS[name]
    model = make()
    reference = copy.deepcopy(model)
    optimizer, reference_optimizer = make_optimizer(model.parameters()), make_optimizer(reference.parameters())
    is_classifier = loss_fn is not F.mse_loss
    criterion = nn.CrossEntropyLoss() if loss_fn is F.cross_entropy else nn.NLLLoss() if is_classifier else nn.MSELoss()
    batches = []
    for _ in range(7):
        x = torch.randn(shape)
        batches.append((x, _target(loss_fn, x, model(x).shape[-1])))
    for step, (x, y) in enumerate(batches):
        if step == 2:
            model, criterion = kernels.fuse(model), kernels.fuse(criterion)
            optimizer = kernels.fuse_optimizer(optimizer)
        for net, crit, opt in ((model, criterion, optimizer), (reference, loss_fn, reference_optimizer)):
            opt.zero_grad()
            crit(net(x), y).backward()
            opt.step()
    assert type(optimizer).__name__.startswith("Fused")
    if loss_fn is F.cross_entropy:
        assert isinstance(criterion, kernels.FusedCrossEntropyLoss)
    for (key, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", TUTORIAL_MODELS)
def test_state_dicts_load_both_ways(name):
    make, shape, *_ = TUTORIAL_MODELS[name]
    plain, other_plain = make(), make()
    fused = kernels.fuse(make())
    fused.load_state_dict(plain.state_dict())  # a checkpoint of the tutorial's model
    x = torch.randn(shape)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    other_plain.load_state_dict(fused.state_dict())  # and back
    torch.testing.assert_close(other_plain(x), plain(x))


def test_sequential_keeps_its_indices_and_the_report_says_what_changed(capsys):
    torch.manual_seed(0)
    model = mnist_mlp_sgd.NeuralNetwork()
    stack = model.linear_relu_stack
    first, last = stack[0], stack[4]
    assert kernels.fuse(model, verbose=True) is model
    assert len(stack) == 5 and [type(m).__name__ for m in stack] == [
        "FusedLinear", "Absorbed", "FusedLinear", "Absorbed", "FusedLinear"]
    assert stack[0].weight is first.weight and stack[4].bias is last.bias
    report = capsys.readouterr().out.splitlines()
    assert report[0] == "kernels.fuse(NeuralNetwork): 3 replacements (parameters and state_dict keys unchanged)"
    assert report[1].split() == ["linear_relu_stack.0,", "linear_relu_stack.1", "Linear(784,", "512),", "ReLU", "->",
                                 "FusedLinear(activation='relu'),", "Absorbed"]
    assert report[3].split()[:4] == ["linear_relu_stack.4", "Linear(128,", "10)", "->"]
    kernels.fuse(model, verbose=True)  # a second call finds nothing left
    assert capsys.readouterr().out == "kernels.fuse(NeuralNetwork): nothing to replace\n"


def test_only_exact_pairs_in_a_plain_sequential_are_fused():
    class Reversed(nn.Sequential):  # runs its children backwards: Linear then ReLU is not a pair here
        def forward(self, x):
            for m in reversed(self):
                x = m(x)
            return x

    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.0), nn.ReLU(),  # not directly followed
        nn.Linear(4, 4), nn.ReLU6(),  # not an activation FusedLinear has
        nn.Linear(4, 4), nn.Tanh(), nn.Tanh(),  # the second Tanh stays
        Reversed(nn.ReLU(), nn.Linear(4, 4)),
    )
    reference = copy.deepcopy(model)
    kernels.fuse(model)
    assert [type(m).__name__ for m in model[:8]] == ["FusedLinear", "Dropout", "ReLU", "FusedLinear", "ReLU6",
                                                      "FusedLinear", "Absorbed", "Tanh"]
    assert [m.activation for m in _fused_layers(model)] == ["none", "none", "tanh", "none"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_a_fused_sequential_compiles_whole_and_saves():
    """The Absorbed placeholders (a __call__ of their own) let torch.compile trace the fused stack
    as one graph, and the model pickles and loads like any other."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Sigmoid())
    fused = kernels.fuse(copy.deepcopy(plain))
    assert str(fused[1]) == "Absorbed(relu: applied by the FusedLinear before it)"
    x = torch.randn(64, 8)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
    saved = io.BytesIO()
    torch.save(fused, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert [type(m).__name__ for m in loaded] == ["FusedLinear", "Absorbed", "FusedLinear", "Absorbed"]
    torch.testing.assert_close(loaded(x), plain(x), rtol=1e-5, atol=1e-6)


def test_hooks_on_an_absorbed_activation_run_as_on_the_activation():
    """A forward or backward hook registered on the Absorbed placeholder sees what one on the
    activation module it replaced sees: the activation's output and its gradient."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    fused = kernels.fuse(copy.deepcopy(plain))
    assert not fused[1].hooked
    seen = {"plain": [], "fused": []}
    for name, model in (("plain", plain), ("fused", fused)):
        model[1].register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.detach().clone()))
        model[1].register_full_backward_hook(lambda m, gi, go, name=name: seen[name].append(go[0].clone()))
    assert fused[1].hooked
    x = torch.randn(3, 4)
    for model in (plain, fused):
        model(x).square().sum().backward()
    assert len(seen["fused"]) == len(seen["plain"]) == 2
    for ours, theirs in zip(seen["fused"], seen["plain"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_modules_that_are_not_plain_linear_layers_are_left_alone(capsys):
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyLinear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    model.append(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)))
    model.append(nn.utils.spectral_norm(nn.Linear(3, 3)))  # the old form: weight_orig, and a forward pre-hook
    attention = nn.MultiheadAttention(4, 2)
    wrapper = nn.ModuleDict({"mlp": model, "attention": attention})
    reference = copy.deepcopy(wrapper)
    kernels.fuse(wrapper, verbose=True)
    assert type(model[0]) is MyLinear and type(model[1]) is nn.ReLU and type(model[2]) is kernels.FusedLinear
    assert type(model[3]).__name__ == "ParametrizedLinear" and type(model[4]) is nn.Linear
    assert type(attention.out_proj) is not kernels.FusedLinear
    out = capsys.readouterr().out
    assert "left alone: mlp.0: MyLinear, a subclass of nn.Linear" in out
    assert "left alone: mlp.3: ParametrizedLinear, a subclass of nn.Linear" in out
    assert "left alone: mlp.4: its weight is not a plain parameter of its own" in out
    assert "left alone: attention.out_proj: NonDynamicallyQuantizableLinear, a subclass of nn.Linear" in out
    model.eval(), reference.eval()  # spectral norm's power iteration stops
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), reference["mlp"](x), rtol=1e-5, atol=1e-6)


def test_a_shared_linear_stays_one_set_of_parameters():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    reference = copy.deepcopy(model)
    kernels.fuse(model)
    assert [m.activation for m in model if isinstance(m, kernels.FusedLinear)] == ["relu", "none"]
    assert model[0].weight is model[2].weight is shared.weight
    assert len(list(model.parameters())) == 2 and list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)


def test_cross_entropy_keeps_its_settings():
    weight = torch.rand(5)
    loss = nn.CrossEntropyLoss(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.1)
    fused = kernels.fuse(loss)
    assert type(fused) is kernels.FusedCrossEntropyLoss
    assert fused.weight is weight and (fused.ignore_index, fused.reduction, fused.label_smoothing) == (2, "sum", 0.1)
    assert list(fused.state_dict()) == list(loss.state_dict()) == ["weight"]
    logits, target = torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 4, 2, 1, 0])
    torch.testing.assert_close(fused(logits, target), loss(logits, target))
    inside = nn.Sequential(nn.Linear(3, 5), nn.CrossEntropyLoss(reduction="none"))
    kernels.fuse(inside)
    assert type(inside[1]) is kernels.FusedCrossEntropyLoss and inside[1].reduction == "none"


def test_fuse_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got function"):
        kernels.fuse(F.relu)


# --- fuse_optimizer --------------------------------------------------------------------------

OPTIMIZERS = {
    "Adam": lambda groups: torch.optim.Adam(groups, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1),
    "Adam-amsgrad-maximize": lambda groups: torch.optim.Adam(groups, lr=1e-2, amsgrad=True, maximize=True),
    "Adam-decoupled": lambda groups: torch.optim.Adam(groups, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=1e-2, foreach=True),
    "SGD": lambda groups: torch.optim.SGD(groups, lr=1e-2),
    "SGD-momentum": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "SGD-nesterov-maximize": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True,
                                                            maximize=True),
}
FUSED = {torch.optim.Adam: "FusedAdam", torch.optim.AdamW: "FusedAdamW", torch.optim.SGD: "FusedSGD"}


def _two_groups(model):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_optimizer_goes_on_where_the_torch_one_was(name):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    optimizer, reference_optimizer = OPTIMIZERS[name](_two_groups(model)), OPTIMIZERS[name](_two_groups(reference))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    reference_scheduler = torch.optim.lr_scheduler.StepLR(reference_optimizer, step_size=2, gamma=0.5)
    x, y = torch.randn(10, 6), torch.randn(10, 3)

    def step(net, opt, sched):
        opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()

    for _ in range(3):
        step(model, optimizer, scheduler)
        step(reference, reference_optimizer, reference_scheduler)
    before = copy.deepcopy(optimizer.state_dict())
    fused = kernels.fuse_optimizer(optimizer)
    assert type(fused).__name__ == FUSED[type(optimizer)]
    assert all(p is q for g, h in zip(fused.param_groups, optimizer.param_groups) for p, q in zip(g["params"], h["params"]))
    for g, h in zip(fused.param_groups, optimizer.param_groups):  # every torch setting, and maybe more of ours
        torch_settings = {k: v for k, v in h.items() if k not in ("params", "foreach")}
        assert {k: g[k] for k in torch_settings} == torch_settings
        assert g["foreach"] is None and "initial_lr" in g
    fused_scheduler = torch.optim.lr_scheduler.StepLR(fused, step_size=2, gamma=0.5)  # a scheduler moves over
    fused_scheduler.load_state_dict(scheduler.state_dict())
    for _ in range(5):
        step(model, fused, fused_scheduler)
        step(reference, reference_optimizer, reference_scheduler)
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    after = optimizer.state_dict()  # the torch optimizer shares no state with the fused one
    for pid, state in before["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(after["state"][pid][key], value), (pid, key)
    back = OPTIMIZERS[name](_two_groups(model))
    back.load_state_dict(fused.state_dict())  # and back into torch's class
    for p_back, p in zip(back.state.values(), fused.state.values()):
        for key, value in p.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(p_back[key].cpu().to(value.dtype), value.cpu(), msg=key)
    extra = nn.Parameter(torch.randn(2))
    fused.add_param_group({"params": [extra]})  # later groups take the torch optimizer's defaults
    assert fused.param_groups[-1]["lr"] == optimizer.defaults["lr"]


def test_fuse_optimizer_refuses_what_it_cannot_convert():
    params = [nn.Parameter(torch.randn(3))]
    fused = kernels.FusedAdam(params)
    assert kernels.fuse_optimizer(fused) is fused
    with pytest.raises(TypeError, match=r"no fused counterpart of torch\.optim\.rmsprop\.RMSprop"):
        kernels.fuse_optimizer(torch.optim.RMSprop(params))

    class MyAdam(torch.optim.Adam):
        pass

    with pytest.raises(TypeError, match="MyAdam; it converts torch.optim.Adam, torch.optim.AdamW and torch.optim.SGD"):
        kernels.fuse_optimizer(MyAdam(params))
    with pytest.raises(ValueError, match="differentiable=True"):
        kernels.fuse_optimizer(torch.optim.SGD(params, lr=0.1, differentiable=True))
