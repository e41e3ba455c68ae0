"""kernels.MLPStep (the MLP's forward, loss and backward in one C++ call) against PyTorch's
nn.Linear + activation + F.cross_entropy + autograd, and against this library's own autograd
path, which runs the same kernels and so must agree to the last bit."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import FusedLinear, MLPStep
from kernels.cpu.mlp import LAYER_FIELDS

TORCH_ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def make_layers(sizes, activation="relu", dtype=torch.float32, bias=True):
    return [FusedLinear(i, o, bias=bias, activation="none" if k == len(sizes) - 2 else activation, dtype=dtype)
            for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]


def torch_step(layers, x, target):
    """Loss and parameter gradients from nn.functional ops and autograd, in float64."""
    params = [p.detach().double().requires_grad_() for layer in layers for p in (layer.weight, layer.bias)
              if p is not None]
    it = iter(params)
    h = x.double()
    for layer in layers:
        w = next(it)
        b = next(it) if layer.bias is not None else None
        h = F.linear(h, w, b)
        if layer.activation != "none":
            h = TORCH_ACTIVATIONS[layer.activation](h)
    loss = F.cross_entropy(h, target)
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def parameters(layers):
    return [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("sizes,activation,M", [
    ((784, 128, 64, 10), "relu", 64),    # the MNIST MLP at batch 64
    ((784, 512, 128, 10), "relu", 64),   # the wider tutorial network
    ((33, 17, 5), "sigmoid", 7),
    ((9, 20, 11, 3), "tanh", 1),
    ((12, 4), "relu", 5),                # no hidden layer: logistic regression
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_matches_pytorch(sizes, activation, M, dtype):
    kernels.set_backend("cpu")
    layers = make_layers(sizes, activation, dtype)
    x = torch.randn(M, sizes[0], dtype=dtype)
    target = torch.randint(0, sizes[-1], (M,))
    loss = MLPStep(layers)(x, target)
    want_loss, want_grads = torch_step(layers, x, target)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert loss.dtype == dtype and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    for p, want in zip(parameters(layers), want_grads):
        assert p.grad.shape == p.shape and p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), want, **tol)


def test_equals_the_autograd_path(threads):
    """The same kernels in the same order as kernels.linear/cross_entropy under autograd: bitwise equal."""
    kernels.set_backend("cpu")
    layers = make_layers((784, 128, 64, 10))
    x, target = torch.randn(64, 784), torch.randint(0, 10, (64,))
    loss = MLPStep(layers)(x, target)
    grads = [p.grad.clone() for p in parameters(layers)]
    for p in parameters(layers):
        p.grad = None
    h = x
    for layer in layers:
        h = layer(h)
    want = kernels.cross_entropy(h, target)
    want.backward()
    assert torch.equal(loss, want.detach())
    for got, p in zip(grads, parameters(layers)):
        assert torch.equal(got, p.grad)


def test_no_bias_and_ignored_targets():
    layers = make_layers((10, 6, 4), "tanh", bias=False)
    x, target = torch.randn(8, 10), torch.tensor([0, 1, -100, 3, 2, -100, 1, 0])
    loss = MLPStep(layers)(x, target)
    want_loss, want_grads = torch_step(layers, x, target)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    for p, want in zip(parameters(layers), want_grads):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_index_gathers_rows_and_overwrites_gradients():
    """step(x_all, target_all, index) is step(x_all[index], target_all[index]); gradients are
    overwritten in place (existing .grad tensors keep their storage), not accumulated."""
    layers = make_layers((20, 16, 5))
    x_all, target_all = torch.randn(100, 20), torch.randint(0, 5, (100,))
    step = MLPStep(layers)
    grads = [torch.full_like(p, 7.0) for p in parameters(layers)]
    for p, g in zip(parameters(layers), grads):
        p.grad = g
    for index in (torch.randperm(100)[:32], torch.randperm(100)[:32], torch.arange(9)):
        loss = step(x_all, target_all, index)
        want_loss, want_grads = torch_step(layers, x_all[index], target_all[index])
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
        for p, g, want in zip(parameters(layers), grads, want_grads):
            assert p.grad is g
            torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)


def test_parameters_and_gradients_replaced_between_calls():
    """A step checks again what it skipped checking while the parameter and gradient tensors
    stayed where they were: storage given through ``.data``, a new or non-contiguous ``.grad``,
    a parameter of another dtype (an error)."""
    layers = make_layers((12, 8, 3))
    step = MLPStep(layers)
    x, target = torch.randn(6, 12), torch.randint(0, 3, (6,))

    def check():
        loss = step(x, target)
        want_loss, want_grads = torch_step(layers, x, target)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
        for p, want in zip(parameters(layers), want_grads):
            torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-6)

    check()
    layers[0].weight.data = torch.randn(8, 12)
    check()
    layers[1].weight.grad = torch.zeros(8, 3).t()  # not contiguous: replaced by a new one
    check()
    assert layers[1].weight.grad.is_contiguous()
    layers[0].bias.grad = None
    check()
    layers[1].bias.data = layers[1].bias.data.double()
    with pytest.raises(TypeError, match="one dtype"):
        step(x, target)


def test_trains_like_the_autograd_path():
    """Ten Adam steps through MLPStep and through nn.Linear + autograd + torch.optim.Adam end at the same weights."""
    layers = make_layers((30, 16, 4))
    ref = [torch.nn.Linear(layer.in_features, layer.out_features) for layer in layers]
    for r, layer in zip(ref, layers):
        r.load_state_dict(layer.state_dict())
    ref_model = torch.nn.Sequential(ref[0], torch.nn.ReLU(), ref[1])
    opt, ref_opt = torch.optim.Adam(parameters(layers), lr=1e-2), torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    step = MLPStep(layers)
    for _ in range(10):
        x, target = torch.randn(16, 30), torch.randint(0, 4, (16,))
        step(x, target)
        opt.step()
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x), target).backward()
        ref_opt.step()
    for p, r in zip(parameters(layers), ref_model.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-5)


OPTIMIZERS = {
    "adam": lambda ps: kernels.FusedAdam(ps, lr=1e-2),
    "adam-amsgrad-wd": lambda ps: kernels.FusedAdam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    "adamw": lambda ps: kernels.FusedAdamW(ps, lr=1e-2),
    "sgd": lambda ps: kernels.FusedSGD(ps, lr=0.1),
    "sgd-nesterov": lambda ps: kernels.FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening": lambda ps: kernels.FusedSGD(ps, lr=0.1, momentum=0.9, dampening=0.5),
    "two groups": lambda ps: kernels.FusedAdam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.1}], lr=1e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=list(OPTIMIZERS))
def test_optimizer_step_inside_the_native_call(make_optimizer, dtype):
    """MLPStep(layers, optimizer) is MLPStep(layers) followed by optimizer.step(), to the bit,
    step after step (SGD's first momentum step included), gathered rows or not; with two groups
    (more than one launch) it calls optimizer.step() itself."""
    layers, reference = make_layers((20, 16, 5), dtype=dtype), make_layers((20, 16, 5), dtype=dtype)
    for ours, theirs in zip(layers, reference):
        theirs.load_state_dict(ours.state_dict())
    optimizer, reference_optimizer = make_optimizer(parameters(layers)), make_optimizer(parameters(reference))
    step, reference_step = MLPStep(layers, optimizer), MLPStep(reference)
    x_all, target_all = torch.randn(50, 20, dtype=dtype), torch.randint(0, 5, (50,))
    for i in range(6):
        index = torch.randint(0, 50, (8,)) if i % 2 else None
        args = (x_all, target_all, index) if index is not None else (x_all[:8], target_all[:8])
        loss, want = step(*args), reference_step(*args)
        reference_optimizer.step()
        assert torch.equal(loss, want)
        for p, q in zip(parameters(layers), parameters(reference)):
            assert torch.equal(p, q)
    assert optimizer.state_dict()["state"].keys() == reference_optimizer.state_dict()["state"].keys()


def test_native_update_is_skipped_for_bad_targets_and_bad_arguments():
    """A target out of range raises before any gradient or update is written; the C++ step
    refuses an update with the wrong number of arguments before it runs anything."""
    from kernels import _C

    layers = make_layers((6, 5, 3))
    optimizer = kernels.FusedSGD(parameters(layers), lr=0.1)
    step = MLPStep(layers, optimizer)
    before = [p.detach().clone() for p in parameters(layers)]
    with pytest.raises(ValueError, match="out of range"):
        step(torch.randn(4, 6), torch.tensor([0, 1, 3, 1]))
    assert all(torch.equal(p, b) for p, b in zip(parameters(layers), before))
    with pytest.raises(TypeError, match="FusedAdam, FusedAdamW or FusedSGD"):
        MLPStep(layers, torch.optim.SGD(parameters(layers), lr=0.1))
    x, target, loss = torch.randn(4, 6), torch.tensor([0, 1, 2, 1]), torch.empty(())
    step(x, target)
    with pytest.raises(ValueError, match="sgd update takes a tuple of 4 scalars and 2 flags"):
        _C.mlp_step("float32", x.data_ptr(), target.data_ptr(), 0, 4, 0, 0, loss.data_ptr(), 4, 1,
                    step._layer_list(4, torch.float32), "relu", "sgd", 0, 0, (0.1, False), 1)
    with pytest.raises(ValueError, match="several steps in one call need an index of rows and an optimizer"):
        _C.mlp_step("float32", x.data_ptr(), target.data_ptr(), 0, 4, 0, 0, loss.data_ptr(), 4, 2,
                    step._layer_list(4, torch.float32), "relu", "", 0, 0, (), 1)


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=list(OPTIMIZERS))
def test_several_steps_in_one_call_are_those_steps_one_call_each(make_optimizer):
    """A 2-D index (S, M) runs S steps: the same losses, parameters and optimizer state, to the
    bit, as S calls on its rows (SGD's first momentum step and Adam's step counts included; with
    two groups, S calls are what it makes)."""
    layers, reference = make_layers((20, 16, 5)), make_layers((20, 16, 5))
    for ours, theirs in zip(layers, reference):
        theirs.load_state_dict(ours.state_dict())
    optimizer, reference_optimizer = make_optimizer(parameters(layers)), make_optimizer(parameters(reference))
    step, reference_step = MLPStep(layers, optimizer), MLPStep(reference, reference_optimizer)
    x_all, target_all = torch.randn(50, 20), torch.randint(0, 5, (50,))
    for calls in (torch.randint(0, 50, (7, 8)), torch.randint(0, 50, (1, 8)), torch.empty(0, 8, dtype=torch.int64),
                  torch.randint(0, 50, (3, 8))):
        losses = step(x_all, target_all, calls)
        assert losses.shape == (len(calls),)
        want = [reference_step(x_all, target_all, rows) for rows in calls]
        assert torch.equal(losses, torch.stack(want) if want else torch.empty(0))
        for p, q in zip(parameters(layers), parameters(reference)):
            assert torch.equal(p, q)
    state, reference_state = optimizer.state_dict()["state"], reference_optimizer.state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(reference_state[i][k]))
               for i in state for k, v in state[i].items())


def test_several_steps_check_every_target_before_the_first_step():
    layers = make_layers((6, 5, 3))
    optimizer = kernels.FusedAdam(parameters(layers), lr=0.1)
    step = MLPStep(layers, optimizer)
    x_all, target_all = torch.randn(10, 6), torch.tensor([0, 1, 2, 1, 0, 5, 1, 2, 0, 1])
    before = [p.detach().clone() for p in parameters(layers)]
    with pytest.raises(ValueError, match=r"step 1 of the 2: cross_entropy: target\[2\] = 5 is out of range for 3"):
        step(x_all, target_all, torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert all(torch.equal(p, b) for p, b in zip(parameters(layers), before))
    assert all(float(state["step"]) == 0 for state in optimizer.state.values())  # no update ran
    with pytest.raises(ValueError, match=r"asks for 2 steps, which need the optimizer inside"):
        MLPStep(layers)(x_all, target_all, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(IndexError, match=r"index\[4\] = 10 is out of range for 10 rows"):
        step(x_all, target_all, torch.tensor([[0, 1], [2, 3], [10, 1]]))


def test_layer_fields_match_the_cpp_step():
    from kernels import _C

    assert tuple(_C.mlp_layer_fields) == LAYER_FIELDS


def test_ignore_index_is_cross_entropys_default_in_python_and_cpp():
    import inspect

    from kernels import _C
    from kernels.cpu.mlp import IGNORE_INDEX

    default = inspect.signature(torch.nn.functional.cross_entropy).parameters["ignore_index"].default
    assert _C.mlp_ignore_index == IGNORE_INDEX == default


def test_errors():
    layers = make_layers((6, 5, 3))
    step = MLPStep(layers)
    x, target = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"target\[2\] = 3 is out of range for 3 classes"):
        step(x, torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match=r"input of shape \(4, 5\) has 5 features, the first layer takes 6"):
        step(x[:, :5], target)
    with pytest.raises(ValueError, match="target has 3 rows but input has 4"):
        step(x, target[:3])
    with pytest.raises(TypeError, match="target must be a 1-D int64"):
        step(x, target.int())
    with pytest.raises(TypeError, match="input is torch.float64 on cpu, the parameters are torch.float32"):
        step(x.double(), target)
    with pytest.raises(TypeError, match=r"index must be a 1-D \(one step\) or 2-D \(a step per row\) int64"):
        step(x, target, torch.tensor([0.5]))
    with pytest.raises(IndexError, match=r"index\[1\] = 4 is out of range for 4 rows"):
        step(x, target, torch.tensor([0, 4]))
    with pytest.raises(IndexError, match=r"index\[0\] = -1 is out of range"):
        step(x, target, torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"target\[1\] = 7 is out of range for 3 classes"):
        step(x, torch.tensor([0, 1, 2, 7]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="activation must be 'none'"):
        MLPStep(make_layers((6, 5, 3))[:1])
    with pytest.raises(ValueError, match="layer 1 takes 4 features but layer 0 gives 5"):
        MLPStep([FusedLinear(6, 5), FusedLinear(4, 3, activation="none")])
    with pytest.raises(ValueError, match="share one activation"):
        MLPStep([FusedLinear(6, 5), FusedLinear(5, 5, activation="tanh"), FusedLinear(5, 3, activation="none")])
    with pytest.raises(TypeError, match="layer 0 is a Linear, not a kernels.FusedLinear"):
        MLPStep([torch.nn.Linear(6, 3)])
    with pytest.raises(TypeError, match="parameters of one dtype"):
        MLPStep([FusedLinear(6, 5), FusedLinear(5, 3, activation="none", dtype=torch.float64)])(x, target)
