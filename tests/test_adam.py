"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW: the same random problems, stepped
side by side for ~50 steps, must give the same parameters and optimizer states."""
import gc
import io
import weakref

import pytest
import torch

import kernels
from kernels import FusedAdam, FusedAdamW

HAS_CUDA = torch.cuda.is_available()
# Odd sizes that do not divide the Triton block (64 under the interpreter), a scalar-like
# tensor and an empty one; about 450 elements so that the interpreter stays quick.
SHAPES = [(13, 17), (101,), (3, 5, 7), (1,), (0, 3)]
STEPS = 50
LR = 1e-2  # large enough that 50 steps move every parameter by ~0.5


def make_problem(device, shapes=SHAPES, steps=STEPS, dtype=torch.float32, seed=0):
    """Initial parameters and one gradient per parameter per step."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]
             for _ in range(steps)]
    return init, grads


def train_beside_float32_masters(make_ours, make_theirs, device, dtype, *, shapes=SHAPES, steps=STEPS):
    """Trains ``dtype`` (bf16/fp16) parameters with ``make_ours(params)`` beside float32 copies
    trained with torch's ``make_theirs(masters)``, each step from the copies of the rounded
    parameters: after every step the parameters equal the masters rounded to ``dtype``.
    Returns (params, ours, masters, theirs)."""
    init, grads = make_problem(device, shapes=shapes, steps=steps)
    params = [p.to(dtype).requires_grad_() for p in init]
    ours = make_ours(params)
    masters = [p.detach().float().requires_grad_() for p in params]
    theirs = make_theirs(masters)
    for gs in grads:
        for p, m, g in zip(params, masters, gs):
            p.grad = g.to(dtype)
            m.grad = p.grad.float()
            m.data.copy_(p.detach().float())
        ours.step()
        theirs.step()
        for p, m in zip(params, masters):
            torch.testing.assert_close(p.detach(), m.detach().to(dtype), atol=0, rtol=2 ** -7)
    return params, ours, masters, theirs


def train(make_opt, init, grads, *, params=None, opt=None, has_grad=None, scheduler=None, start=0):
    """Run ``make_opt`` over ``grads[start:]``; ``has_grad(step, i)`` False leaves a gradient None."""
    if params is None:
        params = [p.clone().requires_grad_() for p in init]
    if opt is None:
        opt = make_opt(params)
    sched = scheduler(opt) if scheduler else None
    for step in range(start, len(grads)):
        opt.zero_grad(set_to_none=True)
        for i, (p, g) in enumerate(zip(params, grads[step])):
            if has_grad is None or has_grad(step, i):
                p.grad = g.clone()
        opt.step()
        if sched:
            sched.step()
    return params, opt


def assert_same(ours, theirs, *, atol=1e-6, rtol=1e-5):
    """Parameters and every piece of optimizer state match (the state keys too); float64
    tensors to 1e-12."""
    (p_ours, opt_ours), (p_theirs, opt_theirs) = ours, theirs
    tolerance = dict(atol=atol, rtol=rtol)
    for i, (a, b) in enumerate(zip(p_ours, p_theirs)):
        atol, rtol = (1e-12, 1e-12) if a.dtype == torch.float64 else (tolerance["atol"], tolerance["rtol"])
        torch.testing.assert_close(a.detach(), b.detach(), atol=atol, rtol=rtol, msg=lambda m: f"param {i}: {m}")
        s_ours, s_theirs = opt_ours.state.get(a, {}), opt_theirs.state.get(b, {})
        assert s_ours.keys() == s_theirs.keys(), f"param {i}: state keys {s_ours.keys()} vs {s_theirs.keys()}"
        for key in s_theirs:
            if key == "step":
                assert float(s_ours[key]) == float(s_theirs[key]), f"param {i}: step"
                assert s_ours[key].dtype == torch.float32 and s_ours[key].dim() == 0
            else:
                torch.testing.assert_close(s_ours[key], s_theirs[key].to(s_ours[key].dtype), atol=atol, rtol=rtol,
                                           msg=lambda m: f"param {i} {key}: {m}")


OPTIONS = {
    "plain": (FusedAdam, torch.optim.Adam, {}),
    "weight_decay": (FusedAdam, torch.optim.Adam, dict(weight_decay=0.1)),
    "amsgrad": (FusedAdam, torch.optim.Adam, dict(amsgrad=True)),
    "maximize": (FusedAdam, torch.optim.Adam, dict(maximize=True, weight_decay=0.05)),
    "betas_eps": (FusedAdam, torch.optim.Adam, dict(betas=(0.3, 0.8), eps=1e-3)),
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
    "adamw_amsgrad_maximize": (FusedAdamW, torch.optim.AdamW, dict(amsgrad=True, maximize=True)),
    "adam_decoupled": (FusedAdam, torch.optim.Adam, dict(weight_decay=0.2, decoupled_weight_decay=True)),
    "tensor_betas": (FusedAdam, torch.optim.Adam, dict(betas=(torch.tensor(0.8), torch.tensor(0.99)))),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_matches_torch(backend, option):
    ours_cls, torch_cls, kwargs = OPTIONS[option]
    init, grads = make_problem(backend.device)
    ours = train(lambda ps: ours_cls(ps, lr=LR, **kwargs), init, grads)
    # torch's single-tensor path on every device (its foreach path rejects tensor betas)
    theirs = train(lambda ps: torch_cls(ps, lr=LR, foreach=False, **kwargs), init, grads)
    assert_same(ours, theirs)
    assert not torch.equal(ours[0][0], init[0])


@pytest.mark.parametrize("option", ["plain", "adamw_amsgrad_maximize", "weight_decay"])
def test_every_cpu_isa(cpu_isa, option):
    """The AVX-512, AVX2 and portable builds of the C++ step against torch.optim."""
    ours_cls, torch_cls, kwargs = OPTIONS[option]
    init, grads = make_problem("cpu", steps=10)
    assert_same(train(lambda p: ours_cls(p, lr=LR, **kwargs), init, grads),
                train(lambda p: torch_cls(p, lr=LR, **kwargs), init, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_decaying_into_subnormals(backend, dtype):
    """Gradients of exactly zero make the first moments decay by beta1 per step, from 10x the
    smallest normal number into the subnormal range, which the C++ step flushes to zero for
    speed: parameters and moments still match torch.optim.Adam to within that range, and the
    caller's thread does not inherit the flushing."""
    tiny = torch.finfo(dtype).tiny
    init, grads = make_problem(backend.device, shapes=[(40,), (7, 3)], steps=2, dtype=dtype)
    runs = []
    for make_opt in (lambda ps: FusedAdam(ps, lr=LR), lambda ps: torch.optim.Adam(ps, lr=LR)):
        params, opt = train(make_opt, init, grads)
        for p in params:
            opt.state[p]["exp_avg"].copy_(10 * tiny * torch.sign(opt.state[p]["exp_avg"]))
            p.grad = torch.zeros_like(p)
        for _ in range(40):  # 10 * 0.9^40 = 0.15: torch's moments end up subnormal
            opt.step()
        runs.append((params, opt))
    (params, ours), (reference, theirs) = runs
    assert all(((m != 0) & (m.abs() < tiny)).all() for m in (theirs.state[p]["exp_avg"] for p in reference))
    for p, q in zip(params, reference):
        exact = dtype == torch.float64  # float32 differs by rounding, as in every test here
        torch.testing.assert_close(p.detach(), q.detach(), atol=0 if exact else 1e-6, rtol=1e-12 if exact else 1e-5)
        torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], atol=10 * tiny, rtol=0)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], atol=0, rtol=1e-5)
    x = torch.full((64,), tiny / 4, dtype=dtype)
    assert (x * 2 != 0).all() and (x.sum() != 0)


def test_float64_and_mixed_dtypes_in_one_group(backend):
    """float64 to 1e-12; a group mixing float32 and float64 takes one launch per dtype."""
    init, grads = make_problem(backend.device, dtype=torch.float64, steps=20)
    init[1], grads = init[1].float(), [[g if i != 1 else g.float() for i, g in enumerate(gs)] for gs in grads]
    ours = train(lambda ps: FusedAdam(ps, lr=LR, amsgrad=True), init, grads)
    theirs = train(lambda ps: torch.optim.Adam(ps, lr=LR, amsgrad=True), init, grads)
    assert_same(ours, theirs)
    assert ours[0][1].dtype == torch.float32 and ours[1].state[ours[0][1]]["exp_avg"].dtype == torch.float32


def test_param_groups_and_none_grads(backend):
    """Groups with their own hyper-parameters; a parameter that never has a gradient gets no
    state, one whose gradient is None every other step keeps its own step count, and a step
    where no parameter has a gradient changes nothing."""
    init, grads = make_problem(backend.device)

    def groups(ps):
        return [dict(params=ps[:2], lr=0.02, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
                dict(params=ps[2:4]),
                dict(params=ps[4:], eps=1e-4, maximize=True)]

    def has_grad(step, i):
        return i != 3 and not (i == 1 and step % 2) and step != 7

    ours = train(lambda ps: FusedAdam(groups(ps), lr=LR), init, grads, has_grad=has_grad)
    theirs = train(lambda ps: torch.optim.Adam(groups(ps), lr=LR), init, grads, has_grad=has_grad)
    assert_same(ours, theirs)
    params, opt = ours
    assert params[3] not in opt.state
    assert float(opt.state[params[1]]["step"]) == STEPS // 2  # step 7 (no gradients) is odd


SCHEDULERS = {
    "step": (LR, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)),
    # OneCycleLR also cycles beta1 (cycle_momentum) every step.
    "one_cycle": (LR, lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)),
    # A tensor lr is updated in place by the scheduler and read by the kernel from its memory.
    "tensor_lr": (None, lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)),
}


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_lr_scheduler(backend, schedule):
    lr, scheduler = SCHEDULERS[schedule]
    init, grads = make_problem(backend.device)

    def lr_value():
        return torch.tensor(LR, device=backend.device) if lr is None else lr

    ours = train(lambda ps: FusedAdam(ps, lr=lr_value()), init, grads, scheduler=scheduler)
    theirs = train(lambda ps: torch.optim.Adam(ps, lr=lr_value(), foreach=False), init, grads, scheduler=scheduler)
    assert_same(ours, theirs)
    assert float(ours[1].param_groups[0]["lr"]) != LR


def test_one_launch_per_group(backend, monkeypatch):
    check_one_launch_per_group(backend, monkeypatch, "adam", lambda groups: FusedAdam(groups, lr=LR), steps=2)


def check_one_launch_per_group(backend, monkeypatch, op: str, make_opt, steps: int) -> None:
    """Each group's step is one kernel call, whatever its number of tensors (FusedAdam's and
    FusedSGD's tests call this)."""
    from kernels.cpu import extension
    from kernels.ops.param_table import CURRENT

    module = kernels._dispatch.implementation(op, backend.name)
    calls = []
    launch = module.step
    monkeypatch.setattr(module, "step", lambda *a, **k: calls.append(1) or launch(*a, **k))

    class CountingGuard(extension().TableGuard):  # a CPU table's guard launches its step itself
        def launch(self, *args):
            status = super().launch(*args)
            calls.extend([1] if status == CURRENT else [])
            return status

    monkeypatch.setattr(extension(), "TableGuard", CountingGuard)
    init, grads = make_problem(backend.device, steps=steps)
    params = [p.clone().requires_grad_() for p in init]
    opt = make_opt([{"params": params[:3]}, {"params": params[3:], "lr": 0.1}])
    train(None, init, grads, params=params, opt=opt)
    assert len(calls) == 2 * len(grads)


def test_gradients_moving_between_steps(backend):
    """Gradients that alternate between two sets of tensors (new addresses every step, the
    table's rows are made again) and gradients updated in place (same addresses, the table is
    reused: built once)."""
    init, grads = make_problem(backend.device, steps=12)
    buffers = [[g.clone() for g in grads[0]] for _ in range(2)]

    def run(cls):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, lr=LR)
        for step, gs in enumerate(grads):
            for p, buf, g in zip(params, buffers[step % 2] if step < 6 else buffers[0], gs):
                p.grad = buf
                buf.copy_(g)
            opt.step()
        return params, opt

    ours = run(FusedAdam)
    assert_same(ours, run(torch.optim.Adam))
    assert ours[1].table_builds == 7  # the first, then one per move (steps 1-6), none after


def test_table_built_once_with_fixed_gradients(backend):
    """Gradients kept at fixed addresses (zeroed in place) never rebuild the table."""
    init, grads = make_problem(backend.device, steps=5)
    params = [p.clone().requires_grad_() for p in init]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = FusedAdam(params, lr=LR)
    for gs in grads:
        opt.zero_grad(set_to_none=False)
        for p, g in zip(params, gs):
            p.grad.add_(g)
        opt.step()
    assert opt.table_builds == 1


def test_new_gradients_let_the_old_ones_go(backend):
    """Steps with new gradient tensors (a zero_grad(set_to_none=True) loop) keep no reference to
    the gradients of earlier steps, however the backend puts the new addresses in its table."""
    init, grads = make_problem(backend.device, steps=3)
    params = [p.clone().requires_grad_() for p in init]
    opt = FusedAdam(params, lr=LR)
    earlier = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        earlier.append([weakref.ref(p.grad) for p in params])
        opt.step()
    gc.collect()
    assert all(r() is None for refs in earlier[:-1] for r in refs)
    assert all(r() is not None for r in earlier[-1])


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_gradient_in_another_layout(backend, layout):
    """A transposed or expanded .grad is taken as torch.optim.Adam takes it, also when the
    gradient changes layout after the first step."""
    init, grads = make_problem(backend.device, shapes=[(4, 3), (5,)], steps=6)

    def run(cls):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, lr=LR)
        for step, (g0, g1) in enumerate(grads):
            if step == 0:
                params[0].grad = g0.clone()
            elif layout == "transposed":
                params[0].grad = g0.t().contiguous().t()
            else:
                params[0].grad = g0[:1].expand(4, 3)
            params[1].grad = g1.clone()
            opt.step()
        return params, opt

    assert_same(run(FusedAdam), run(torch.optim.Adam))


def test_zero_grad_and_closure(backend):
    init, _ = make_problem(backend.device, shapes=[(4, 3)], steps=0)
    x = torch.randn(5, 4, device=backend.device)

    def run(cls):
        w = init[0].clone().requires_grad_()
        opt = cls([w], lr=LR)
        losses = []
        for _ in range(3):
            opt.zero_grad()

            def closure():
                loss = (x @ w).square().sum()
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
        assert w.grad is not None
        opt.zero_grad()
        assert w.grad is None
        return [w], opt, losses

    *ours, ours_losses = run(FusedAdam)
    *theirs, theirs_losses = run(torch.optim.Adam)
    assert_same(ours, theirs)
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-6)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_does_what_torch_does(set_to_none):
    """Our zero_grad (its own loop for set_to_none=True) leaves every gradient as torch.optim's
    does: None, or zeros in the same tensor, detached; parameters of every group, those
    without a gradient left alone."""
    def run(cls):
        torch.manual_seed(0)
        a, b, c = (torch.randn(n, requires_grad=True) for n in (3, 4, 5))
        opt = cls([{"params": [a, b]}, {"params": [c], "lr": 0.1}])
        (a.sum() * 2 + c.square().sum()).backward()  # b gets no gradient
        a.grad = a.grad.clone().requires_grad_()  # one that autograd would record ops on
        grads = [p.grad for p in (a, b, c)]
        opt.zero_grad(set_to_none=set_to_none)
        return [(p.grad is None, p.grad is g, None if p.grad is None else (p.grad.tolist(), p.grad.requires_grad))
                for p, g in zip((a, b, c), grads)]

    ours, theirs = run(FusedAdam), run(torch.optim.Adam)
    assert ours == theirs
    assert [none for none, _, _ in ours] == ([True, True, True] if set_to_none else [False, True, False])


def test_step_hooks():
    """Step pre/post hooks run as in torch.optim (their wrapper only runs when one is registered)."""
    p = torch.zeros(3, requires_grad=True)
    opt = FusedAdam([p], lr=LR)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    pre.remove(), post.remove()
    opt.step()
    assert seen == ["pre", "post"] and float(opt.state[p]["step"]) == 2


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_interchange(backend, direction):
    """Train 20 steps with one class, move the state_dict (through torch.save) to the other,
    train 20 more steps: the same as training all 40 with torch.optim.Adam."""
    check_state_dict_interchange(torch.optim.Adam, FusedAdam, dict(lr=LR, amsgrad=True, weight_decay=0.01),
                                 direction, backend.device)


def check_state_dict_interchange(torch_class, fused_class, kwargs: dict, direction: str, device) -> None:
    """20 steps with one class, its state_dict through torch.save into the other, 20 more steps:
    the same parameters and state as 40 steps of the torch class."""
    init, grads = make_problem(device, steps=40)
    first, second = (torch_class, fused_class) if direction == "torch_to_ours" else (fused_class, torch_class)
    params, opt = train(lambda ps: first(ps, **kwargs), init, grads[:20])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = second(resumed_params, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed = train(None, init, grads, params=resumed_params, opt=resumed, start=20)
    reference = train(lambda ps: torch_class(ps, **kwargs), init, grads)
    assert_same(resumed, reference)


def test_loaded_state_is_not_shared_with_the_source(backend):
    """torch keeps loaded state tensors shared with the state_dict; ours are copies, so the
    source optimizer can keep training alongside."""
    init, grads = make_problem(backend.device, steps=20)
    params, opt = train(lambda ps: torch.optim.Adam(ps, lr=LR), init, grads[:10])
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = FusedAdam(twin_params, lr=LR)
    twin.load_state_dict(opt.state_dict())
    train(None, init, grads, params=params, opt=opt, start=10)
    twin = train(None, init, grads, params=twin_params, opt=twin, start=10)
    assert_same(twin, (params, opt))


def test_state_dict_format(backend):
    """The keys and dtypes of torch.optim.Adam's state_dict."""
    init, grads = make_problem(backend.device, steps=2)
    ours = train(lambda ps: FusedAdam(ps, lr=LR, amsgrad=True), init, grads)[1].state_dict()
    theirs = train(lambda ps: torch.optim.Adam(ps, lr=LR, amsgrad=True), init, grads)[1].state_dict()
    assert ours["param_groups"][0].keys() == theirs["param_groups"][0].keys()
    assert ours["state"].keys() == theirs["state"].keys()
    for key, state in theirs["state"].items():
        assert list(ours["state"][key]) == list(state)
        for name, value in state.items():
            assert ours["state"][key][name].shape == value.shape and ours["state"][key][name].dtype == value.dtype


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)),
    dict(weight_decay=-0.1), dict(lr=torch.tensor([1e-3, 1e-3])),
], ids=["lr", "eps", "beta1", "beta2", "weight_decay", "lr_tensor_shape"])
def test_bad_hyperparameters_rejected_as_torch_does(kwargs):
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError) as ours:
        FusedAdam([torch.zeros(2, requires_grad=True)], **kwargs)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match=str(theirs.value).split(":")[0]):
        FusedAdam([{"params": [torch.zeros(2, requires_grad=True)], **kwargs}])


@pytest.mark.parametrize("flag", ["foreach", "differentiable"])
def test_unsupported_flags(flag):
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        FusedAdam([torch.zeros(2, requires_grad=True)], **{flag: True})


@pytest.mark.parametrize("after_a_step", [False, True])
def test_sparse_gradient_rejected(backend, after_a_step):
    p = torch.zeros(4, 3, device=backend.device, requires_grad=True)
    opt = FusedAdam([p])
    if after_a_step:
        p.grad = torch.ones(4, 3, device=backend.device)
        opt.step()
    p.grad = torch.ones(4, 3, device=backend.device).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("data", ["bigger", "smaller", "float64"])
def test_new_gradient_changed_through_data_raises(backend, data):
    """A new gradient tensor whose data is swapped (``g.data = ...``) after it was assigned can
    have any shape or dtype (torch's .grad setter checked the tensor it was given): the step
    raises, as torch.optim.Adam does, instead of walking it as the parameter's."""
    shape = {"bigger": (8, 3), "smaller": (2, 3), "float64": (4, 3)}[data]
    for cls in (torch.optim.Adam, FusedAdam):
        p = torch.zeros(4, 3, device=backend.device, requires_grad=True)
        opt = cls([p], lr=LR)
        p.grad = torch.ones(4, 3, device=backend.device)
        opt.step()
        p.grad = torch.ones(4, 3, device=backend.device)
        p.grad.data = torch.ones(shape, device=backend.device, dtype=torch.float64 if data == "float64" else p.dtype)
        with pytest.raises((RuntimeError, ValueError)):
            opt.step()


def test_table_layouts_match_the_cpp_kernels():
    """csrc/adam.cpp and csrc/sgd.cpp restate the table layouts defined in Python."""
    from kernels import _C
    from kernels.ops.param_table import ADAM_LAYOUT, SGD_LAYOUT

    assert _C.adam_table_fields == ADAM_LAYOUT
    assert _C.sgd_table_fields == SGD_LAYOUT
    assert ADAM_LAYOUT[-1] == SGD_LAYOUT[-1] == "numel"  # where csrc/param_table.h reads it


def test_table_status_codes_match_the_cpp_guard():
    """csrc/param_table.cpp's TableGuard returns the statuses defined in Python."""
    from kernels import _C
    from kernels.ops.param_table import CURRENT, GRADIENTS

    assert _C.table_status_codes["current"] == CURRENT and _C.table_status_codes["gradients"] == GRADIENTS
    assert _C.table_status_codes["other"] not in (CURRENT, GRADIENTS)


@pytest.mark.parametrize("cls", [FusedAdam, kernels.FusedSGD, torch.optim.Adam])
def test_an_optimizer_in_a_reference_cycle_is_collected(cls):
    """The table's guard (C++) holds the parameters, gradients and states it checks, and shows
    them to Python's garbage collector: a cycle through a parameter (an attribute holding the
    optimizer) is collected, as with torch.optim's."""
    def make():
        p = torch.randn(10, requires_grad=True)
        opt = cls([p], lr=0.1)
        p.optimizer = opt
        for _ in range(2):
            p.grad = torch.ones(10)
            opt.step()
        return weakref.ref(opt), weakref.ref(p)

    refs = make()
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="own parameter group"):
        FusedAdam([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)])


def test_unsupported_dtypes_rejected(monkeypatch):
    kernels.set_backend("cpu")
    with pytest.raises(TypeError, match="the cpu backend supports float32, float64"):
        FusedAdam([torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)])
    with pytest.raises(TypeError, match="floating-point"):
        FusedAdam([torch.zeros(2, dtype=torch.int64)])
    opt = FusedAdam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(TypeError, match="float16"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float16, requires_grad=True)]})
    assert len(opt.param_groups) == 1


# Splits that cut a tensor (the first), and splits among odd-sized tensors, where each thread's
# part starts at a cache-line multiple of a tensor's length (csrc/param_table.h's walk_table).
SPLIT_SHAPES = [[(300, 301), (7,), (257,)], [(5,), (33_331,), (1,), (16_411,), (3,), (33_339,), (17,)]]


@pytest.mark.parametrize("shapes", SPLIT_SHAPES)
@pytest.mark.parametrize("threads", [2, 3], indirect=True, ids=lambda n: f"{n}-thread")
def test_cpu_threads_split_tensors(shapes, threads):
    """Enough elements for several threads: the threads' ranges cut through tensors."""
    init, grads = make_problem("cpu", shapes=shapes, steps=5)
    for dtype in (torch.float32, torch.float64):
        ps = [p.to(dtype) for p in init]
        gs = [[g.to(dtype) for g in step] for step in grads]
        assert_same(train(lambda p: FusedAdam(p, lr=LR), ps, gs),
                    train(lambda p: torch.optim.Adam(p, lr=LR), ps, gs))


def test_torch_reference_backend(monkeypatch):
    kernels.set_backend("torch")
    init, grads = make_problem("cpu", steps=10)
    ours = train(lambda ps: FusedAdamW(ps, lr=LR, amsgrad=True), init, grads)
    assert_same(ours, train(lambda ps: torch.optim.AdamW(ps, lr=LR, amsgrad=True), init, grads), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# State that changes under the optimizer: PyTorch's behaviour, never a stale address


def _stepped(cls, backend, shape=(16,), steps=2, **kwargs):
    p = torch.randn(shape, device=backend.device, dtype=torch.float64).requires_grad_()
    opt = cls([p], lr=LR, **kwargs)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


@pytest.mark.parametrize("reset", ["new_state_mapping", "state_cleared"])
def test_state_reset_starts_afresh_as_in_torch(backend, reset):
    """``opt.state = defaultdict(dict)`` and ``opt.state[p].clear()`` (common ways to reset
    Adam) make torch.optim.Adam start the parameter's state from zero: so does ours, instead of
    updating the freed tensors the old table pointed to."""
    import collections

    init, grads = make_problem(backend.device, steps=8, dtype=torch.float64)

    def run(cls):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, lr=LR, amsgrad=True)
        for step, gs in enumerate(grads):
            if step == 4:
                if reset == "new_state_mapping":
                    opt.state = collections.defaultdict(dict)
                else:
                    opt.state[params[0]].clear()
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    ours, theirs = run(FusedAdam), run(torch.optim.Adam)
    assert_same(ours, theirs)
    assert float(ours[1].state[ours[0][0]]["step"]) == 4


def _new_gradient_data(p, data):
    """A new gradient tensor for p whose data is then swapped for ``data``: what torch's .grad
    setter checked (dtype, device, shape) no longer holds."""
    p.grad = p.grad.clone()
    p.grad.data = data


MUTATIONS = {
    "nothing": lambda opt, ps: None,
    "new gradient tensor": lambda opt, ps: setattr(ps[0], "grad", ps[0].grad.clone()),
    "gradient moved in place": lambda opt, ps: setattr(ps[0].grad, "data", ps[0].grad.detach().clone()),
    "new gradient of other strides": lambda opt, ps: setattr(ps[0], "grad", ps[0].grad.t().contiguous().t()),
    "new sparse gradient": lambda opt, ps: setattr(ps[0], "grad", ps[0].grad.to_sparse()),
    "new gradient retyped through .data": lambda opt, ps: _new_gradient_data(ps[0], ps[0].grad.double()),
    "new gradient reshaped through .data": lambda opt, ps: _new_gradient_data(ps[0], ps[0].grad[:2]),
    "gradient set to None": lambda opt, ps: setattr(ps[1], "grad", None),
    "gradless parameter gets one": lambda opt, ps: setattr(ps[2], "grad", torch.ones_like(ps[2])),
    "parameter moved through .data": lambda opt, ps: setattr(ps[0], "data", ps[0].detach().clone()),
    "parameter reshaped through .data": lambda opt, ps: setattr(ps[1], "data", ps[1].detach().view(1, -1)),
    "state dict replaced": lambda opt, ps: opt.state.__setitem__(ps[0], dict(opt.state[ps[0]])),
    "state tensor replaced": lambda opt, ps: opt.state[ps[1]].__setitem__("exp_avg", opt.state[ps[1]]["exp_avg"].clone()),
    "state cleared": lambda opt, ps: opt.state[ps[0]].clear(),
    "state mapping replaced": lambda opt, ps: setattr(opt, "state", type(opt.state)(dict, opt.state)),
    "amsgrad switched on": lambda opt, ps: opt.param_groups[0].__setitem__("amsgrad", True),
    "amsgrad off in other words": lambda opt, ps: opt.param_groups[0].__setitem__("amsgrad", 0),
    "params list grows": lambda opt, ps: opt.param_groups[0]["params"].append(torch.zeros(2, requires_grad=True)),
    "params list replaced": lambda opt, ps: opt.param_groups[0].__setitem__("params", list(ps)),
    "group replaced": lambda opt, ps: opt.param_groups.__setitem__(0, dict(opt.param_groups[0])),
    "state moved to another key": lambda opt, ps: opt.state.__setitem__(torch.zeros(1), opt.state.pop(ps[0])),
    "another tensor's state added": lambda opt, ps: opt.state.__setitem__(torch.zeros(1), {}),
}
STILL_CURRENT = ("nothing", "another tensor's state added", "amsgrad off in other words")
GRADIENTS_ONLY = ("new gradient tensor", "gradient moved in place")
# new gradients the guard refuses to put in the rows as they are (the general path copies, raises)
NEW_GRADIENT_FORMS = ("new gradient of other strides", "new sparse gradient", "new gradient retyped through .data",
                      "new gradient reshaped through .data")


def _stepped_with_a_gradless_parameter():
    """Three parameters, the last without a gradient, and a FusedAdam after one step over them."""
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True),
              torch.randn(4, requires_grad=True)]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    opt = FusedAdam(params, lr=LR)
    opt.step()
    return params, opt


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_quick_table_check_agrees_with_the_full_one(mutation):
    """The check every step makes first (the C++ TableGuard) never says current or gradients-only
    where the detailed one (GroupTable.changes) does not, and is sure of itself in the cases a
    training loop meets at every step."""
    from kernels._C import table_status_codes
    from kernels.ops.param_table import CURRENT, GRADIENTS

    OTHER = table_status_codes["other"]
    params, opt = _stepped_with_a_gradless_parameter()
    table = opt._tables[0]
    MUTATIONS[mutation](opt, params)
    group = opt.param_groups[0]
    quick, (full, _) = table.guard.status(group, opt.state), table.changes(opt, group)
    assert quick in (full, OTHER) and (full == CURRENT) == (mutation in STILL_CURRENT)
    assert (quick == CURRENT) == (mutation in ("nothing", "amsgrad off in other words"))
    assert (quick == GRADIENTS) == (mutation in GRADIENTS_ONLY)
    assert (full == GRADIENTS) == (mutation in GRADIENTS_ONLY + NEW_GRADIENT_FORMS)
    if mutation in STILL_CURRENT:  # the next step finds it current again, and quickly
        opt.step()
        assert opt._tables[0] is table and table.guard.status(group, opt.state) == CURRENT


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_guard_steps_only_a_table_it_vouches_for(mutation):
    """A CPU step is checked and launched in one C++ call (TableGuard.launch). Where the check finds
    the table current, or only new gradients, each of its row's form (which it puts in the rows),
    it runs the step, exactly one, and says CURRENT; anything else it leaves to Python, the
    parameters untouched, with the check's code."""
    from kernels.ops.param_table import CURRENT, GRADIENTS

    params, opt = _stepped_with_a_gradless_parameter()
    table, reference = opt._tables[0], torch.optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=LR)
    reference.load_state_dict(opt.state_dict())
    MUTATIONS[mutation](opt, params)
    group = opt.param_groups[0]
    before = [p.detach().clone() for p in params]
    expected = table.guard.status(group, opt.state)
    assert table.launches
    found = table.guard.launch(group, opt.state, opt.hyperparameters(group))
    if expected not in (CURRENT, GRADIENTS):
        assert found == expected and all(torch.equal(p, b) for p, b in zip(params, before))
        return
    assert found == CURRENT
    for p, q in zip(params[:2], reference.param_groups[0]["params"]):
        q.grad = p.grad.clone()
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(params, reference.param_groups[0]["params"]))
    grads, addresses = table.guard.gradients()
    assert all(g is p.grad and a == p.grad.data_ptr() for g, a, p in zip(grads, addresses, params[:2]))
    assert table.guard.status(group, opt.state) == CURRENT
    assert opt.table_builds == 1 + (expected == GRADIENTS)


@pytest.mark.parametrize("cls", [FusedAdam, kernels.FusedSGD])
def test_a_steps_gradients_are_freed_once_the_next_takes_new_ones(backend, cls):
    """In a zero_grad(set_to_none=True) loop the table holds only the gradients in its rows: those
    of a step are freed when the next step has put new ones there."""
    params = [torch.randn(5, 3, device=backend.device, requires_grad=True) for _ in range(2)]
    opt = cls(params, lr=LR, momentum=0.9) if cls is kernels.FusedSGD else cls(params, lr=LR)
    refs = []
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        refs.append([weakref.ref(p.grad) for p in params])
        opt.step()
        opt.zero_grad()
    assert [[r() is None for r in step] for step in refs] == [[True, True]] * 3 + [[False, False]]


def test_which_cpu_tables_the_guard_steps():
    """The guard steps a CPU table itself where the group's step is one C++ launch; a group of two
    dtypes (two launches) or with a gradient to copy first is stepped from Python. A launch the
    guard was not given, or of an unknown op, is refused, and bad arguments change nothing."""
    from kernels.ops.param_table import GRADIENTS

    def table_of(params, grads, cls=FusedAdam, **kwargs):
        for p, g in zip(params, grads):
            p.grad = g
        opt = cls(params, lr=LR, **kwargs)
        opt.step()
        opt.step()
        return opt._tables[0]

    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert table_of([a], [torch.randn(4, 3)]).launches
    assert table_of([a], [torch.randn(4, 3)], kernels.FusedSGD, momentum=0.9).launches  # after its first step
    assert not table_of([a, b], [torch.randn(4, 3), torch.randn(3, dtype=torch.float64)]).launches
    assert not table_of([a], [torch.randn(3, 4).t()]).launches
    table = table_of([a], [torch.randn(4, 3)])
    a.grad, before = torch.randn(4, 3), a.detach().clone()  # a new gradient, and bad arguments: nothing changes
    with pytest.raises(ValueError, match="the adam update takes a tuple of 5 scalars and 3 flags"):
        table.guard.launch(table.group, table.state, (LR,))
    assert table.guard.status(table.group, table.state) == GRADIENTS and torch.equal(a, before)
    assert table.guard.gradients()[0][0] is not a.grad
    with pytest.raises(ValueError, match="unknown optimizer update lamb"):
        table.guard.set_launch("lamb", "float32", 0, 1, 1, 7, torch.get_num_threads)
    with pytest.raises(ValueError, match="a table of 2 rows .* for a guard of 1 rows"):
        table.guard.set_launch("adam", "float32", 0, 2, 1, 7, torch.get_num_threads)
    table.guard.set_launch("", "", 0, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="no step was set"):
        table.guard.launch(table.group, table.state, (LR, 0.9, 0.999, 1e-8, 0.0, False, False, False))


def test_loaded_moments_of_another_size_raise_as_in_torch(backend):
    """A torch.optim.Adam state_dict saved for a (10,) parameter loaded for a (20,) one: torch
    raises at its step (a size mismatch), and so do we, before any kernel reads the moments."""
    p10 = torch.zeros(10, device=backend.device, requires_grad=True)
    source = torch.optim.Adam([p10], lr=LR)
    p10.grad = torch.ones(10, device=backend.device)
    source.step()
    for cls in (torch.optim.Adam, FusedAdam):
        p20 = torch.zeros(20, device=backend.device, requires_grad=True)
        opt = cls([p20], lr=LR)
        opt.load_state_dict(source.state_dict())
        p20.grad = torch.ones(20, device=backend.device)
        with pytest.raises(RuntimeError, match="size of tensor a"):
            opt.step()
    assert torch.equal(p20, torch.zeros(20, device=backend.device))


def test_parameter_replaced_through_data_raises_as_in_torch(backend):
    """``p.data = a bigger tensor`` after steps on a (16,) parameter: torch raises on the
    moments' size; so do we, instead of walking 64 elements of 16-element moments."""
    for cls in (torch.optim.Adam, FusedAdam):
        p, opt = _stepped(cls, backend)
        p.data = torch.randn(64, device=backend.device, dtype=torch.float64)
        p.grad = torch.randn(64, device=backend.device, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="size of tensor a"):
            opt.step()


def test_parameter_moved_through_data_keeps_training(backend):
    """``p.data = a tensor of the same shape`` (a new address): the table follows it."""
    init, grads = make_problem(backend.device, steps=6)

    def run(cls):
        params = [p.clone().requires_grad_() for p in init]
        opt = cls(params, lr=LR)
        for step, gs in enumerate(grads):
            if step == 3:
                params[1].data = params[1].data.clone()
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return params, opt

    assert_same(run(FusedAdam), run(torch.optim.Adam))


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
def test_first_moment_rounds_as_torch(backend, beta1):
    """exp_avg is PyTorch's lerp (from the gradient when 1 - beta1 >= 0.5): with betas (0, 0.99),
    gradients 1 then 1e-8 leave exp_avg at exactly 1e-8 (m + (g - m) * 1 would give 0)."""
    runs = []
    for cls in (FusedAdam, torch.optim.Adam):
        p = torch.zeros(3, device=backend.device, requires_grad=True)
        opt = cls([p], lr=LR, betas=(beta1, 0.99))
        for g in (1.0, 1e-8):
            p.grad = torch.full((3,), g, device=backend.device)
            opt.step()
        runs.append(opt.state[p]["exp_avg"])
    assert torch.equal(runs[0], runs[1]), runs
    if beta1 == 0.0:
        assert torch.equal(runs[0], torch.full((3,), 1e-8, device=backend.device))


@pytest.mark.parametrize("cls", [FusedAdam, FusedAdamW])
def test_complex_parameters_as_torch(backend, cls):
    """Complex parameters are updated as torch.optim.Adam updates them (as real views), and their
    states are complex tensors, as torch's."""
    torch_cls = torch.optim.AdamW if cls is FusedAdamW else torch.optim.Adam
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, dtype=torch.complex64, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn(5, 3, dtype=torch.complex64, generator=gen), torch.randn(7, generator=gen)]
             for _ in range(10)]
    init = [t.to(backend.device) for t in init]
    grads = [[g.to(backend.device) for g in gs] for gs in grads]
    ours = train(lambda ps: cls(ps, lr=LR, weight_decay=0.1, amsgrad=True), init, grads)
    theirs = train(lambda ps: torch_cls(ps, lr=LR, weight_decay=0.1, amsgrad=True), init, grads)
    assert ours[1].state[ours[0][0]]["exp_avg"].dtype == torch.complex64
    assert_same(ours, theirs)


def test_rebuild_under_capture_names_what_changed(monkeypatch):
    """The capture rules, run on the CPU by making the table look like a CUDA one inside a
    capture: a gradient at a new address raises an error that names it and says how to avoid it
    (no table is built), and an unchanged table launches only with capturable=True."""
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    opt = FusedAdam([p], lr=LR)
    opt.step()
    opt._tables[0].cuda, opt._tables[0].launches = True, False  # a CUDA table's step is launched from Python
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capturable is False"):
        opt.step()
    opt.param_groups[0]["capturable"] = True
    opt.step()
    p.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"gradient of parameter 0 is a new tensor .*set_to_none=False"):
        opt.step()
    opt.state[p].clear()
    with pytest.raises(RuntimeError, match="state 'exp_avg' of parameter 0 was replaced or cleared"):
        opt.step()
    assert opt.table_builds == 1 and opt.state[p] == {}  # nothing was built or created in the "capture"


SPECIALIZATION_CHECK = """
import json, torch
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import create_function_from_signature
from kernels.triton import adam, sgd

t = torch.empty(8, dtype=torch.int64)
flags = dict(PARAM_DTYPE=None, COMPUTE=None, LR_ON_DEVICE=False, HAS_WEIGHT_DECAY=False, MAXIMIZE=False,
             ALIGNED=True, BLOCK=1024)
out = {}
for lr in (0.0, 1e-3, 1e300):
    bits = adam.float_bits(lr)
    for name, fn, args, extra in (
            ("adam", adam.adam_kernel, (t, t, t, None, None, None, 2048, bits, bits, bits, bits, bits),
             dict(BETAS_ON_DEVICE=False, DECOUPLED=False, AMSGRAD=False)),
            ("sgd", sgd.sgd_kernel, (t, t, t, None, 2048, bits, bits, bits, bits),
             dict(MOMENTUM=False, NESTEROV=False))):
        binder = create_function_from_signature(fn.signature, fn.params, CUDABackend)
        out.setdefault(name, []).append(repr(binder(*args, **flags, **extra)[1]))
print(json.dumps(out))
"""


def test_one_compiled_variant_for_every_scalar_value():
    """The scalars reach the Triton kernels as int64 bits whatever their value: an lr of exactly
    0.0 (bits 0, which Triton would type as int32) specialises the launch as 1e-3 does, so a
    schedule starting at 0 compiles no second variant (checked with Triton's own argument binder,
    which needs no GPU, outside the interpreter)."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SPECIALIZATION_CHECK], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    for kernel, signatures in json.loads(done.stdout.splitlines()[-1]).items():
        assert len(set(signatures)) == 1, (kernel, signatures)


def test_ffnn_training_step_builds_the_table_once():
    """ffnn's training step keeps every gradient in one flat buffer: over several steps the
    optimizer's table is built exactly once and the gradient addresses never change."""
    from ffnn.step import World, make_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(kernels.FusedLinear(12, 8), kernels.FusedLinear(8, 3, activation="none"))
    opt = FusedAdam(model.parameters(), lr=LR)
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    step = make_step(model, opt, torch.nn.functional.cross_entropy, x, y, torch.zeros(()), World(), 1.0)
    addresses = None
    for i in range(5):
        step(torch.arange(8 * i, 8 * i + 8))
        now = [p.grad.data_ptr() for p in model.parameters()]
        assert addresses is None or now == addresses
        addresses = now
    assert opt.table_builds == 1
    assert all(float(opt.state[p]["step"]) == 5 for p in model.parameters())


@pytest.mark.parametrize("cls", ["adam", "sgd"])
def test_compiled_step_without_graph_break(cls):
    """opt.step() under torch.compile(fullgraph=True) (it runs as the custom op kernels::adam_step /
    sgd_step), beside a fullgraph-compiled forward and loss, trains as the eager step does. (Dynamo
    traces no ``loss.backward()`` in a fullgraph function, for any optimizer: backward runs between
    the two compiled functions, as in PyTorch's recipe for compiling an optimizer.)"""
    kernels.set_backend("cpu")
    x, y = torch.randn(16, 10), torch.randint(0, 4, (16,))
    make = {"adam": lambda ps: FusedAdam(ps, lr=LR, amsgrad=True, weight_decay=0.01),
            "sgd": lambda ps: kernels.FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True)}[cls]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(kernels.FusedLinear(10, 6), kernels.FusedLinear(6, 4, activation="none"))
        opt = make(list(model.parameters()))

        def loss_fn():
            return torch.nn.functional.cross_entropy(model(x), y)

        def step():
            opt.step()

        if compiled:
            loss_fn, step = torch.compile(loss_fn, fullgraph=True), torch.compile(step, fullgraph=True)
        for _ in range(4):
            opt.zero_grad(set_to_none=False)
            loss_fn().backward()
            step()
        runs.append((list(model.parameters()), opt))
    (ours, opt), (reference, eager_opt) = runs[1], runs[0]
    assert_same((ours, opt), (reference, eager_opt))


# ------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_float32_states(dtype, device):
    """bf16/fp16 parameters and gradients, float32 states: each step equals torch.optim.Adam
    run on a float32 copy of the parameters, rounded back to the parameter dtype. On the CPU,
    whose kernels compute float32 and float64, such a group runs the torch backend."""
    params, opt, masters, reference = train_beside_float32_masters(
        lambda ps: FusedAdam(ps, lr=LR, weight_decay=0.01, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=0.01, amsgrad=True),
        device, dtype, shapes=[(1000, 37), (4097,), (3,)], steps=30)
    assert opt._tables[0].backend == ("torch" if device == "cpu" else "triton")
    for p, m in zip(params, masters):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.float32
            torch.testing.assert_close(opt.state[p][key], reference.state[m][key], atol=1e-6, rtol=1e-4)
    # A checkpoint keeps the float32 moments through a round trip.
    clone = FusedAdam([p.detach().clone().requires_grad_() for p in params], lr=LR)
    clone.load_state_dict(opt.state_dict())
    for a, b in zip(clone.param_groups[0]["params"], params):
        assert torch.equal(clone.state[a]["exp_avg"], opt.state[b]["exp_avg"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_step_replayed_from_cuda_graph():
    """opt.step() captured once, replayed with new gradients copied into the same tensors and a
    tensor lr changed in place between replays: the same as eager torch.optim.Adam."""
    init, grads = make_problem("cuda", steps=20)
    lr = torch.tensor(LR, device="cuda")
    params = [p.clone().requires_grad_() for p in init]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt = FusedAdam(params, lr=lr, amsgrad=True, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up: compiles the kernel and creates the states
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()

    ref_params = [p.clone().requires_grad_() for p in init]
    ref = torch.optim.Adam(ref_params, lr=LR, amsgrad=True)
    for p, g in zip(ref_params, grads[0]):
        p.grad = g.clone()
    ref.step()
    for step, gs in enumerate(grads[1:]):
        for p, r, g in zip(params, ref_params, gs):
            p.grad.copy_(g)
            r.grad = g.clone()
        new_lr = LR * 0.9 ** step
        lr.fill_(new_lr)
        ref.param_groups[0]["lr"] = new_lr
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert_same((params, opt), (ref_params, ref))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_whole_training_step_in_cuda_graph():
    """A whole training step captured after warm-up steps that zero the gradients in place, so
    every gradient keeps its address from warm-up to replay and the table is built before the
    capture (none may be built inside it). Replays train like eager torch.optim.Adam."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5)).cuda()
    ref_model = torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5)).cuda()
    ref_model.load_state_dict(model.state_dict())
    opt = FusedAdam(model.parameters(), lr=LR, capturable=True)
    ref = torch.optim.Adam(ref_model.parameters(), lr=LR)
    data = [(torch.randn(16, 20, device="cuda"), torch.randint(0, 5, (16,), device="cuda")) for _ in range(12)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def train_step(m, o):
        loss = torch.nn.functional.cross_entropy(m(static_x), static_y)
        loss.backward()
        o.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:3]:
            static_x.copy_(x), static_y.copy_(y)
            opt.zero_grad(set_to_none=False)
            train_step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        static_loss = train_step(model, opt)

    for x, y in data[:3]:
        static_x.copy_(x), static_y.copy_(y)
        ref.zero_grad(set_to_none=True)
        train_step(ref_model, ref)
    for x, y in data[3:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        loss = static_loss.clone()
        ref.zero_grad(set_to_none=True)
        ref_loss = train_step(ref_model, ref)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"]) == len(data)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_capture_needs_capturable():
    p = torch.zeros(3, device="cuda", requires_grad=True)
    p.grad = torch.ones(3, device="cuda")
    opt = FusedAdam([p])
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable is False"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_table_rebuild_during_capture_is_a_clear_error():
    """Gradients set to None before the capture: backward makes new ones inside it, and the
    step says that a gradient moved and how to keep it in place, instead of copying a table."""
    p = torch.zeros(3, device="cuda", requires_grad=True)
    p.grad = torch.ones(3, device="cuda")
    opt = FusedAdam([p], capturable=True)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="gradient of parameter 0 .*set_to_none=False"):
        with torch.cuda.graph(graph):
            p.grad = torch.ones(3, device="cuda")
            opt.step()
