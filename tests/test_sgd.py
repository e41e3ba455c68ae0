"""FusedSGD against torch.optim.SGD: the same random problems, stepped side by side for 50
steps with every option, must give the same parameters and momentum buffers."""

import pytest
import torch

import kernels
from kernels import FusedSGD
from test_adam import (HAS_CUDA, SPLIT_SHAPES, STEPS, check_one_launch_per_group, check_state_dict_interchange,
                       make_problem, train, train_beside_float32_masters)

LR = 0.05


def assert_same(ours, theirs, *, atol=1e-6, rtol=1e-5):
    """Parameters and every piece of optimizer state match (the state keys too); float64 to 1e-12."""
    (p_ours, opt_ours), (p_theirs, opt_theirs) = ours, theirs
    for i, (a, b) in enumerate(zip(p_ours, p_theirs)):
        tol = dict(atol=1e-12, rtol=1e-12) if a.dtype == torch.float64 else dict(atol=atol, rtol=rtol)
        torch.testing.assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"param {i}: {m}")
        s_ours, s_theirs = opt_ours.state.get(a, {}), opt_theirs.state.get(b, {})
        assert s_ours.keys() == s_theirs.keys(), f"param {i}: state keys {s_ours.keys()} vs {s_theirs.keys()}"
        for key in s_theirs:
            torch.testing.assert_close(s_ours[key], s_theirs[key].to(s_ours[key].dtype), **tol,
                                       msg=lambda m: f"param {i} {key}: {m}")


OPTIONS = {
    "plain": {},
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(maximize=True, weight_decay=0.05),
    "momentum": dict(momentum=0.9),
    "momentum_dampening": dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": dict(momentum=0.8, nesterov=True),
    "nesterov_maximize_weight_decay": dict(momentum=0.5, nesterov=True, maximize=True, weight_decay=0.1),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_matches_torch(backend, option):
    kwargs = OPTIONS[option]
    init, grads = make_problem(backend.device)
    ours = train(lambda ps: FusedSGD(ps, lr=LR, **kwargs), init, grads)
    theirs = train(lambda ps: torch.optim.SGD(ps, lr=LR, foreach=False, **kwargs), init, grads)
    assert_same(ours, theirs)
    assert not torch.equal(ours[0][0], init[0])


@pytest.mark.parametrize("option", ["plain", "momentum_dampening", "nesterov_maximize_weight_decay"])
def test_every_cpu_isa(cpu_isa, option):
    """The AVX-512, AVX2 and portable builds of the C++ step against torch.optim.SGD."""
    init, grads = make_problem("cpu", steps=10)
    assert_same(train(lambda p: FusedSGD(p, lr=LR, **OPTIONS[option]), init, grads),
                train(lambda p: torch.optim.SGD(p, lr=LR, **OPTIONS[option]), init, grads))


@pytest.mark.parametrize("option", ["momentum_dampening", "nesterov"])
def test_float64_exact_and_mixed_dtypes(backend, option):
    """float64 to 1e-12; a group mixing float32 and float64 takes one launch per dtype."""
    init, grads = make_problem(backend.device, dtype=torch.float64, steps=20)
    init[1], grads = init[1].float(), [[g if i != 1 else g.float() for i, g in enumerate(gs)] for gs in grads]
    assert_same(train(lambda ps: FusedSGD(ps, lr=LR, **OPTIONS[option]), init, grads),
                train(lambda ps: torch.optim.SGD(ps, lr=LR, **OPTIONS[option]), init, grads))


def test_param_groups_none_grads_and_late_gradients(backend):
    """Groups with their own hyper-parameters; a parameter that never has a gradient gets no
    state; one whose gradient is None every other step keeps its buffer; one whose first gradient
    comes late takes its first momentum step then (buffer = gradient, as torch)."""
    init, grads = make_problem(backend.device)

    def groups(ps):
        return [dict(params=ps[:2], lr=0.02, momentum=0.9, dampening=0.5, weight_decay=0.1),
                dict(params=ps[2:4], momentum=0.7, nesterov=True),
                dict(params=ps[4:], maximize=True)]

    def has_grad(step, i):
        return i != 3 and not (i == 1 and step % 2) and not (i == 2 and step < 9) and step != 7

    ours = train(lambda ps: FusedSGD(groups(ps), lr=LR), init, grads, has_grad=has_grad)
    theirs = train(lambda ps: torch.optim.SGD(groups(ps), lr=LR), init, grads, has_grad=has_grad)
    assert_same(ours, theirs)
    assert ours[0][3] not in ours[1].state


SCHEDULERS = {
    "step": (LR, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)),
    "one_cycle": (LR, lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)),
    "tensor_lr": (None, lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)),
}


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_lr_scheduler(backend, schedule):
    """Schedulers as with torch.optim.SGD (OneCycleLR also cycles momentum); a tensor lr is
    updated in place and read by the kernel."""
    lr, scheduler = SCHEDULERS[schedule]
    init, grads = make_problem(backend.device)

    def lr_value():
        return torch.tensor(LR, device=backend.device) if lr is None else lr

    ours = train(lambda ps: FusedSGD(ps, lr=lr_value(), momentum=0.9), init, grads, scheduler=scheduler)
    theirs = train(lambda ps: torch.optim.SGD(ps, lr=lr_value(), momentum=0.9, foreach=False), init, grads,
                   scheduler=scheduler)
    assert_same(ours, theirs)
    assert float(ours[1].param_groups[0]["lr"]) != LR


def test_one_launch_per_group(backend, monkeypatch):
    check_one_launch_per_group(backend, monkeypatch, "sgd", lambda groups: FusedSGD(groups, lr=LR, momentum=0.9),
                               steps=3)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_interchange(backend, direction, momentum):
    """Train 20 steps with one class, move the state_dict (through torch.save) to the other,
    train 20 more: the same as training all 40 with torch.optim.SGD."""
    kwargs = dict(lr=LR, momentum=momentum, dampening=0.1 if momentum else 0.0, weight_decay=0.01)
    check_state_dict_interchange(torch.optim.SGD, FusedSGD, kwargs, direction, backend.device)


def test_state_dict_format(backend):
    """torch.optim.SGD's state keys and dtypes; the same param_groups keys plus capturable."""
    init, grads = make_problem(backend.device, steps=2)
    ours = train(lambda ps: FusedSGD(ps, lr=LR, momentum=0.9), init, grads)[1].state_dict()
    theirs = train(lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9), init, grads)[1].state_dict()
    assert set(ours["param_groups"][0]) == set(theirs["param_groups"][0]) | {"capturable"}
    assert ours["state"].keys() == theirs["state"].keys()
    for key, state in theirs["state"].items():
        assert list(ours["state"][key]) == list(state)
        for name, value in state.items():
            assert ours["state"][key][name].shape == value.shape and ours["state"][key][name].dtype == value.dtype
    no_momentum = train(lambda ps: FusedSGD(ps, lr=LR), init, grads)[1].state_dict()
    assert no_momentum["state"] == {}  # torch.optim.SGD keeps no state without momentum


def test_state_reset_restarts_momentum_as_in_torch(backend):
    """``opt.state[p].clear()`` or a new state mapping: the next step takes its first momentum
    step again (buffer = gradient), as torch.optim.SGD's does."""
    import collections

    init, grads = make_problem(backend.device, steps=9, dtype=torch.float64)

    def run(cls):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, lr=LR, momentum=0.9, dampening=0.2)
        for step, gs in enumerate(grads):
            if step == 3:
                opt.state[params[0]].clear()
            if step == 6:
                opt.state = collections.defaultdict(dict)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    assert_same(run(FusedSGD), run(torch.optim.SGD))


def test_buffer_of_another_size_raises_as_in_torch(backend):
    """A momentum buffer saved for a (10,) parameter loaded for a (20,) one: torch raises at its
    step; so do we, before any kernel reads the buffer."""
    p10 = torch.zeros(10, device=backend.device, requires_grad=True)
    source = torch.optim.SGD([p10], lr=LR, momentum=0.9)
    p10.grad = torch.ones(10, device=backend.device)
    source.step()
    for cls in (torch.optim.SGD, FusedSGD):
        p20 = torch.zeros(20, device=backend.device, requires_grad=True)
        opt = cls([p20], lr=LR, momentum=0.9)
        opt.load_state_dict(source.state_dict())
        p20.grad = torch.ones(20, device=backend.device)
        with pytest.raises(RuntimeError, match="size of tensor a"):
            opt.step()


def test_complex_and_strided_gradients_as_torch(backend):
    """Complex parameters (as real views, like torch), a transposed and an expanded gradient."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.randn(4, 3, generator=gen),
            torch.randn(5, 2, generator=gen)]
    grads = [[torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.randn(3, 4, generator=gen).t(),
              torch.randn(1, 2, generator=gen).expand(5, 2)] for _ in range(8)]
    init = [t.to(backend.device) for t in init]
    grads = [[g.to(backend.device) for g in gs] for gs in grads]
    kwargs = dict(lr=LR, momentum=0.9, weight_decay=0.1)
    assert_same(train(lambda ps: FusedSGD(ps, **kwargs), init, grads),
                train(lambda ps: torch.optim.SGD(ps, **kwargs), init, grads))


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(momentum=-0.5), dict(weight_decay=-0.1), dict(nesterov=True),
    dict(nesterov=True, momentum=0.9, dampening=0.1), dict(lr=torch.tensor([1e-3, 1e-3])),
], ids=["lr", "momentum", "weight_decay", "nesterov_no_momentum", "nesterov_dampening", "lr_tensor_shape"])
def test_bad_hyperparameters_rejected_as_torch_does(kwargs):
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError) as ours:
        FusedSGD([torch.zeros(2, requires_grad=True)], **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_unsupported_inputs_rejected():
    with pytest.raises(ValueError, match="foreach=True is not supported"):
        FusedSGD([torch.zeros(2, requires_grad=True)], foreach=True)
    with pytest.raises(TypeError, match="floating-point"):
        FusedSGD([torch.zeros(2, dtype=torch.int64)])
    p = torch.zeros(4, 3, requires_grad=True)
    opt = FusedSGD([p], momentum=0.9)
    p.grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_torch_reference_backend():
    kernels.set_backend("torch")
    init, grads = make_problem("cpu", steps=10)
    kwargs = dict(lr=LR, momentum=0.9, dampening=0.2, weight_decay=0.1)
    assert_same(train(lambda ps: FusedSGD(ps, **kwargs), init, grads),
                train(lambda ps: torch.optim.SGD(ps, **kwargs), init, grads), atol=0, rtol=0)


@pytest.mark.parametrize("shapes", SPLIT_SHAPES)
@pytest.mark.parametrize("threads", [2, 3], indirect=True, ids=lambda n: f"{n}-thread")
def test_cpu_threads_split_tensors(shapes, threads):
    """Enough elements for several threads: the threads' ranges cut through tensors."""
    init, grads = make_problem("cpu", shapes=shapes, steps=5)
    kwargs = dict(lr=LR, momentum=0.9, nesterov=True)
    assert_same(train(lambda p: FusedSGD(p, **kwargs), init, grads),
                train(lambda p: torch.optim.SGD(p, **kwargs), init, grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_on_the_cpu(dtype):
    """bf16/fp16 CPU parameters (a dtype the C++ kernels do not compute) run the torch backend
    with a float32 momentum buffer: each step equals torch.optim.SGD run on a float32 copy of the
    parameters, rounded back to the parameter dtype."""
    params, opt, masters, reference = train_beside_float32_masters(
        lambda ps: FusedSGD(ps, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True, weight_decay=0.01),
        "cpu", dtype, steps=20)
    for p, m in zip(params, masters):
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], reference.state[m]["momentum_buffer"])
    assert opt._tables[0].backend == "torch"


# ------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_step_replayed_from_cuda_graph_after_one_eager_step():
    """One eager step (the first momentum step), then a captured one replayed with new gradients
    copied in and a tensor lr changed in place: the kernel cleared the first-step flag on the
    device, so the replays take later steps, as eager torch.optim.SGD."""
    init, grads = make_problem("cuda", steps=12)
    lr = torch.tensor(LR, device="cuda")
    params = [p.clone().requires_grad_() for p in init]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt = FusedSGD(params, lr=lr, momentum=0.9, dampening=0.1, capturable=True)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    ref_params = [p.clone().requires_grad_() for p in init]
    ref = torch.optim.SGD(ref_params, lr=LR, momentum=0.9, dampening=0.1)
    for p, g in zip(ref_params, grads[0]):
        p.grad = g.clone()
    ref.step()
    for step, gs in enumerate(grads[1:]):
        for p, r, g in zip(params, ref_params, gs):
            p.grad.copy_(g)
            r.grad = g.clone()
        lr.fill_(LR * 0.9 ** step)
        ref.param_groups[0]["lr"] = LR * 0.9 ** step
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert_same((params, opt), (ref_params, ref))
