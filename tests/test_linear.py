"""kernels.linear / kernels.FusedLinear against nn.Linear followed by the activation, on every
backend: the C++ kernels, and Triton (interpreted on CPU tensors, compiled on a GPU)."""
import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import FusedLinear
from kernels.reference.linear import forward as linear_reference

HAS_CUDA = torch.cuda.is_available()
ACTIVATIONS = {"relu": nn.ReLU, "none": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def reference_layer(weight, bias, activation, dtype=torch.float64):
    """nn.Linear + the activation module, holding copies of weight/bias in `dtype`."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return nn.Sequential(layer, ACTIVATIONS[activation]())


def tolerance(dtype, reduction):
    """(rtol, atol) for a result summed over `reduction` terms of O(1) products, compared with
    a float64 oracle: rounding error grows about like sqrt(reduction) unit roundoffs."""
    eps = {torch.float64: 1e-15, torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    scale = 8 * eps * math.sqrt(max(reduction, 1))
    return scale, scale


def check_against_nn(x, weight, bias, activation, *, dy=None, grads=("x", "weight", "bias")):
    """Forward and the requested gradients of kernels.linear vs nn.Linear + activation in float64."""
    dtype = x.dtype
    x = x.detach().requires_grad_("x" in grads)
    weight = weight.detach().requires_grad_("weight" in grads)
    if bias is not None:
        bias = bias.detach().requires_grad_("bias" in grads)
    y = kernels.linear(x, weight, bias, activation)

    ref = reference_layer(weight.detach(), None if bias is None else bias.detach(), activation)
    ref[0].weight.requires_grad_("weight" in grads)
    if bias is not None:
        ref[0].bias.requires_grad_("bias" in grads)
    x64 = x.detach().double().requires_grad_("x" in grads)
    y_ref = ref(x64)

    K, N = weight.shape[1], weight.shape[0]
    M = x.numel() // max(K, 1)
    assert y.shape == y_ref.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **dict(zip(("rtol", "atol"), tolerance(dtype, K))))

    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    y_ref.backward(dy.double())
    expected = {"x": (x, x64, N), "weight": (weight, ref[0].weight, M), "bias": (bias, ref[0].bias, M)}
    for name in ("x", "weight", "bias"):
        ours, theirs, reduction = expected[name]
        if ours is None:
            continue
        if name not in grads:
            assert ours.grad is None, f"{name} needs no grad but got one"
            continue
        assert ours.grad.shape == ours.shape and ours.grad.dtype == dtype
        rtol, atol = tolerance(dtype, reduction)
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


def make(M, K, N, *, device, dtype=torch.float32, bias=True):
    """Inputs like a real layer's: x ~ N(0, 1) and nn.Linear's init, so outputs are O(1)."""
    layer = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
    return torch.randn(M, K, device=device, dtype=dtype), layer.weight.detach(), (layer.bias.detach() if bias else None)


SMALL_SHAPES = [(1, 1, 1), (33, 70, 17), (5, 3, 9)]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_nn_linear(backend, shape, activation):
    x, w, b = make(*shape, device=backend.device)
    check_against_nn(x, w, b, activation)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_no_bias(backend, activation):
    x, w, _ = make(33, 70, 17, device=backend.device, bias=False)
    check_against_nn(x, w, None, activation)


# The MLP's three layers at batch 64: 784 -> 128 -> 64 -> 10, the last without activation.
@pytest.mark.parametrize("shape,activation", [((64, 784, 128), "relu"), ((64, 128, 64), "relu"), ((64, 64, 10), "none")],
                         ids=["784-128", "128-64", "64-10"])
def test_mnist_layers(backend, shape, activation):
    x, w, b = make(*shape, device=backend.device)
    check_against_nn(x, w, b, activation)


# Shapes past every blocking boundary of the C++ GEMMs: several column tiles with a ragged
# last one (K = 100, 1030), reductions longer than one block (M = 600 for dW, N = 530 for
# dx), row counts that leave partial micro-tiles, rows 4 KiB apart (K = 1024, whose tiles are
# copied before use); on one thread and on several.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(600, 100, 530), (37, 1030, 21), (300, 1024, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpp_blocking_boundaries(shape, dtype, threads):
    kernels.set_backend("cpu")
    x, w, b = make(*shape, device="cpu", dtype=dtype)
    check_against_nn(x, w, b, "relu")


# The C++ forward's two forms (csrc/linear.cpp): with float32 on AVX2, batches of at least
# in_features / 8 rows and 8 columns a thread take the outer-product form, the others the
# dot-product tile. Each side of that rule, with ragged row tiles (6 rows), column panels (16)
# and vectors (8), a reduction with a tail (K % 8), no reduction at all, and the column split
# between two threads at a multiple of 8.
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(13, 104, 37), (13, 105, 37), (64, 131, 61), (7, 9, 8), (7, 9, 7), (5, 0, 9),
                                   (200, 40, 20)], ids=lambda s: "x".join(map(str, s)))
def test_cpp_forward_forms(shape, bias, threads):
    kernels.set_backend("cpu")
    x, w, b = make(*shape, device="cpu", bias=bias)
    for activation in ACTIVATIONS:
        check_against_nn(x, w, b, activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_cpu_isa(cpu_isa, dtype):
    """The AVX-512, AVX2 and portable builds of the C++ kernels, each against nn.Linear: every
    activation, ragged tiles, the copied tiles of K = 1024, (66, 64, 40): with two threads the
    forward splits its rows at 32, inside a tile of AVX2's 3 rows, and (800, 24, 790): backward
    reductions longer than one block on every ISA (128 to 768 rows), so both GEMMs add to tiles
    they stored before."""
    for shape, activation in [((37, 70, 21), "relu"), ((9, 20, 7), "sigmoid"), ((5, 33, 3), "tanh"),
                              ((40, 1024, 30), "none"), ((66, 64, 40), "relu"), ((800, 24, 790), "tanh")]:
        x, w, b = make(*shape, device="cpu", dtype=dtype)
        check_against_nn(x, w, b, activation)


def test_float64(backend):
    x, w, b = make(9, 20, 7, device=backend.device, dtype=torch.float64)
    check_against_nn(x, w, b, "tanh")


def test_batched_and_unbatched_input(backend):
    w, b = make(1, 6, 4, device=backend.device)[1:]
    x3 = torch.randn(2, 5, 6, device=backend.device)
    check_against_nn(x3, w, b, "relu")
    x1 = torch.randn(6, device=backend.device)
    check_against_nn(x1, w, b, "sigmoid")


def test_non_contiguous_operands(backend):
    dev = backend.device
    x = torch.randn(20, 33, device=dev).t()  # (33, 20), column-major
    w = torch.randn(20, 17, device=dev).t()  # (17, 20) = W with in-features along dim 0
    b = torch.randn(34, device=dev)[::2]  # stride 2
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    check_against_nn(x, w, b, "relu")
    xs = torch.randn(7, 40, device=dev)[:, ::2]  # a strided slice of the features
    check_against_nn(xs, w, b, "tanh")


def test_expanded_output_gradient(backend):
    """y.sum().backward() hands the backward an expanded (stride 0) gradient."""
    x, w, b = make(6, 10, 5, device=backend.device)
    check_against_nn(x, w, b, "relu", dy=torch.ones(1, 1, device=backend.device).expand(6, 5))


@pytest.mark.parametrize("grads", [("weight", "bias"), ("x",), ("bias",), ("weight",)], ids="+".join)
def test_only_needed_gradients(backend, grads):
    x, w, b = make(12, 9, 7, device=backend.device)
    check_against_nn(x, w, b, "relu", grads=grads)


def test_empty_batch(backend):
    x, w, b = make(0, 5, 3, device=backend.device)
    y = kernels.linear(x, w, b)
    assert y.shape == F.linear(x, w, b).shape == (0, 3)
    check_against_nn(x, w, b, "relu")  # dW and db are zeros, as PyTorch's
    assert kernels.linear(torch.randn(2, 0, 5, device=backend.device), w, b).shape == (2, 0, 3)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(3, 0, 4), (0, 5, 3), (3, 5, 0), (0, 0, 2)], ids=lambda s: "x".join(map(str, s)))
def test_cpp_zero_sized_dimensions(shape, activation):
    """in_features = 0 gives act(bias) broadcast over the batch (it divided by K: SIGFPE); an empty
    batch or no output features leave zero gradients, as PyTorch's (the empty batch's backward
    took a reference into an empty vector, which -D_GLIBCXX_ASSERTIONS turns into an abort)."""
    kernels.set_backend("cpu")
    x, w, b = make(*shape, device="cpu")
    check_against_nn(x, w, b, activation)


# z values where the activations' special cases live: NaN, +-inf, signed zeros, saturation.
SPECIAL_Z = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.0, -3.0, 20.0, -20.0, 100.0, -100.0, 1e-3]


@pytest.mark.parametrize("features", [1, 300], ids=["outer-form", "dot-form"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_nan_and_inf_as_torch(cpu_isa, dtype, activation, features):
    """Every SIMD variant gives torch's results where z or dy is NaN or infinite: relu(NaN) = NaN,
    and relu's backward is threshold_backward's (y <= 0 ? 0 : dy, so a NaN output passes dy).
    One input feature takes the forward's outer-product form where it exists (36 rows >= 1 / 8),
    300 its dot-product form; the extra features add +0.0 * -0.0 = -0.0, which leaves every z
    as it is, -0.0 included."""
    z = torch.tensor(SPECIAL_Z * 3, dtype=dtype)
    N = 19  # two vectors and a ragged tail of columns, all equal to z
    x = torch.cat([z[:, None], torch.zeros(len(z), features - 1, dtype=dtype)], dim=1)
    w = torch.cat([torch.ones(N, 1, dtype=dtype), torch.full((N, features - 1), -0.0, dtype=dtype)], dim=1)
    dy = torch.randn(len(z), N, dtype=dtype)
    dy[1::7, 2::5] = float("inf")
    dy[3::11, 1::6] = float("nan")

    def run(fn):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, torch.zeros(N, dtype=dtype)))
        y = fn(xs, ws, bs)
        y.backward(dy)
        return y.detach(), xs.grad, ws.grad, bs.grad

    ours = run(lambda x, w, b: kernels.linear(x, w, b, activation))
    theirs = run(lambda x, w, b: ACTIVATIONS[activation]()(F.linear(x, w, b)))
    for name, got, want in zip(("y", "dx", "dW", "db"), ours, theirs):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_saves_only_the_output(backend):
    """The forward saves y for relu/sigmoid/tanh and no (M, N) tensor for "none"."""
    x, w, b = make(8, 6, 5, device=backend.device)
    x.requires_grad_()
    y = kernels.linear(x, w, b, "relu")
    saved = y.grad_fn.saved_tensors
    assert [t.shape for t in saved if t is not None].count(y.shape) == 1
    assert any(t is not None and t.data_ptr() == y.data_ptr() for t in saved)
    y_none = kernels.linear(x, w, b, "none")
    assert all(t is None or t.data_ptr() != y_none.data_ptr() for t in y_none.grad_fn.saved_tensors)


def test_no_grad_forward(backend):
    x, w, b = make(4, 6, 3, device=backend.device)
    with torch.no_grad():
        y = kernels.linear(x, w.requires_grad_(), b, "sigmoid")
    assert y.grad_fn is None
    torch.testing.assert_close(y, torch.sigmoid(F.linear(x, w, b)))


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_double_backward_gradient_penalty(backend, activation):
    """A WGAN-GP gradient penalty through a two-layer critic: ||d critic / d x||^2 backpropagated
    to every parameter (a graph of the gradient, then its backward), as nn.Linear gives it."""
    x, w1, b1 = make(6, 5, 4, device=backend.device)
    w2, b2 = torch.randn(1, 4, device=backend.device), torch.randn(1, device=backend.device)
    params = [w1, b1, w2, b2]

    def penalty(first, second, x, params):
        x = x.detach().requires_grad_()
        out = second(first(x, *params[:2]), *params[2:])
        (dx,) = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True)
        grads = torch.autograd.grad((dx.norm(2, dim=1) - 1).pow(2).mean(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]  # relu: b1 unused

    ours = penalty(lambda x, w, b: kernels.linear(x, w, b, activation),
                   lambda h, w, b: kernels.linear(h, w, b, "none"), x, [p.requires_grad_() for p in params])
    torch_act = ACTIVATIONS[activation]()
    params64 = [p.detach().double().requires_grad_() for p in params]
    expected = penalty(lambda x, w, b: torch_act(F.linear(x, w, b)), F.linear, x.double(), params64)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_hessian_vector_product(backend, activation):
    """torch.autograd.functional.hvp through the layer (curved activations: a non-zero Hessian)."""
    x, w, b = make(3, 4, 2, device=backend.device)
    v = torch.randn_like(w)
    _, ours = torch.autograd.functional.hvp(lambda w: kernels.linear(x, w, b, activation).pow(2).sum(), w, v)
    torch_act = ACTIVATIONS[activation]()
    x64, b64 = x.double(), b.double()
    _, want = torch.autograd.functional.hvp(lambda w: torch_act(F.linear(x64, w, b64)).pow(2).sum(), w.double(),
                                            v.double())
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_gradcheck_cpp(activation):
    kernels.set_backend("cpu")
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: kernels.linear(*t, activation=activation), (x, w, b))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_gradcheck_triton(activation):
    kernels.set_backend("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: kernels.linear(*t, activation=activation), (x, w, b))


def test_tiny_cpu_layers_run_torch_ops_unless_a_backend_is_forced(monkeypatch):
    """Below SMALL_CPU_WORK multiply-adds a CPU layer runs PyTorch's own ops (equal to nn.Linear +
    activation to the bit, gradients through autograd's own nodes); at or above it, or with the
    backend forced to "cpu", the C++ kernel runs."""
    from kernels.cpu import linear as cpu_linear
    from kernels.ops.linear import SMALL_CPU_WORK

    launches = []
    forward = cpu_linear.forward
    monkeypatch.setattr(cpu_linear, "forward", lambda *a: launches.append(1) or forward(*a))
    x, w, b = make(30, 3, 5, device="cpu")  # the 3-5-1 regression network's first layer
    assert 30 * 3 * 5 < SMALL_CPU_WORK
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = kernels.linear(xs, ws, bs, "relu")
    y.sum().backward()
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    want = torch.relu(F.linear(xt, wt, bt))
    want.sum().backward()
    assert torch.equal(y, want) and not launches
    for got, expected in ((xs.grad, xt.grad), (ws.grad, wt.grad), (bs.grad, bt.grad)):
        assert torch.equal(got, expected)
    kernels.linear(*make(64, 64, 1, device="cpu"), "relu")  # 4,096 multiply-adds
    assert launches == [1]
    kernels.set_backend("cpu")
    kernels.linear(x, w, b, "relu")
    assert launches == [1, 1]


def test_torch_compile_of_a_tiny_cpu_layer():
    """The tiny-CPU path (F.linear behind its checks and its try) traces in one graph."""
    torch._dynamo.reset()
    x, w, b = (t.requires_grad_() for t in make(4, 3, 5, device="cpu"))
    compiled = torch.compile(lambda x: kernels.linear(x, w, b, "tanh"), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, torch.tanh(F.linear(x, w, b)))
    y.sum().backward()
    assert w.grad is not None and x.grad is not None


def test_torch_backend_is_the_reference():
    kernels.set_backend("torch")
    x, w, b = make(5, 4, 3, device="cpu")
    torch.testing.assert_close(kernels.linear(x, w, b, "tanh"), torch.tanh(F.linear(x, w, b)), rtol=0, atol=0)
    torch.testing.assert_close(linear_reference(x, w, None, "none"), F.linear(x, w), rtol=0, atol=0)


def test_backend_choice_at_run_time():
    """The device picks the backend unless set_backend forces one; a bad name is named."""
    x = torch.randn(2, 3)
    assert kernels.backend_for(x) == kernels.backend_for(x.device) == "cpu"
    assert kernels.backend_for(torch.device("meta")) == kernels.backend_for(x.to("meta")) == "torch"
    kernels.set_backend("torch")
    assert kernels.backend_for(x) == "torch"
    kernels.set_backend(" Triton ")
    if HAS_CUDA:  # conftest sets TRITON_INTERPRET=1 only without a GPU
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernels.backend_for(x)
    else:
        assert kernels.backend_for(x) == "triton"
    with pytest.raises(ValueError, match="backend 'cuda' is not one of triton, cpu, torch"):
        kernels.set_backend("cuda")
    with kernels.use_backend("torch"):
        assert kernels.backend_for(x) == "torch"
    assert kernels.get_backend() == "triton"
    kernels.set_backend(None)
    assert kernels.backend_for(x) == "cpu"


def test_backend_from_the_environment_at_import():
    """KERNELS_BACKEND sets the backend that kernels starts with."""
    code = "import torch, kernels; print(kernels.get_backend(), kernels.backend_for(torch.zeros(1)))"
    env = dict(os.environ, KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "torch"]


# ---------------------------------------------------------------------------------------------
# FusedLinear: an nn.Linear + activation drop-in.

@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_nn_linear(backend, bias):
    torch.manual_seed(1)
    ours = FusedLinear(20, 7, bias=bias, activation="tanh", device=backend.device)
    torch.manual_seed(1)
    theirs = nn.Linear(20, 7, bias=bias, device=backend.device)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for p, q in zip(ours.parameters(), theirs.parameters()):  # same init, same random draws
        assert p.shape == q.shape and torch.equal(p, q)
    x = torch.randn(3, 20, device=backend.device)
    torch.testing.assert_close(ours(x), torch.tanh(theirs(x)))


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias):
    ours = FusedLinear(6, 4, bias=bias, activation="sigmoid")
    theirs = nn.Linear(6, 4, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v)
    other = nn.Linear(6, 4, bias=bias)
    ours.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    x = torch.randn(2, 6)
    torch.testing.assert_close(ours(x), torch.sigmoid(other(x)))


def test_module_repr_and_dtype():
    layer = FusedLinear(784, 128, dtype=torch.float64)
    assert repr(layer) == "FusedLinear(in_features=784, out_features=128, bias=True, activation='relu')"
    assert layer.weight.dtype == layer.bias.dtype == torch.float64
    assert repr(FusedLinear(3, 2, bias=False, activation="none")).endswith("bias=False, activation='none')")
    with pytest.raises(ValueError, match="activation must be one of.*'gelu'"):
        FusedLinear(3, 2, activation="gelu")


def test_torch_compile(backend):
    """A model built from FusedLinear compiles in one graph (the custom ops) and trains."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    dev = backend.device
    model = nn.Sequential(FusedLinear(12, 8, device=dev), FusedLinear(8, 4, activation="none", device=dev))
    ref = nn.Sequential(nn.Linear(12, 8, device=dev), nn.ReLU(), nn.Linear(8, 4, device=dev))
    ref[0].load_state_dict(model[0].state_dict())
    ref[2].load_state_dict(model[1].state_dict())
    compiled = torch.compile(model, backend="aot_eager" if dev.type == "cpu" else "inductor", fullgraph=True)
    x = torch.randn(5, 12, device=dev)
    target = torch.randint(0, 4, (5,), device=dev)
    F.cross_entropy(compiled(x), target).backward()
    F.cross_entropy(ref(x), target).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors that name the problem.

def test_errors(backend):
    check_errors(backend.device)


def test_errors_of_tiny_cpu_layers():
    """A tiny CPU layer runs F.linear with fewer checks of its own (kernels.ops.linear._small_on_cpu):
    the same errors as any other call, including for what F.linear would let through (a 1-D
    weight, a bias that broadcasts, a weight on another device)."""
    from kernels.ops.linear import SMALL_CPU_WORK

    assert kernels.get_backend() is None and 4 * 6 * 3 < SMALL_CPU_WORK
    check_errors(torch.device("cpu"))
    x, w, b = make(4, 6, 3, device="cpu")
    with pytest.raises(ValueError, match=r"weight must have 2 dimension.*\(6,\)"):
        kernels.linear(x, w[0], None)
    with pytest.raises(ValueError, match=r"bias of shape \(1,\) does not match weight of shape \(3, 6\)"):
        kernels.linear(x, w, b[:1])
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        kernels.linear(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="bias is on meta but input is on cpu"):
        kernels.linear(x, w, b.to("meta"))


def check_errors(dev: torch.device) -> None:
    x, w, b = make(4, 6, 3, device=dev)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        kernels.linear([[1.0] * 6], w, b)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        kernels.linear(x, w.tolist(), b)
    with pytest.raises(ValueError, match=r"input must have at least 1 dimension"):
        kernels.linear(torch.tensor(1.0, device=dev), w, b)
    with pytest.raises(ValueError, match=r"weight must have 2 dimension.*\(3, 6, 1\)"):
        kernels.linear(x, w.unsqueeze(-1), b)
    with pytest.raises(ValueError, match=r"input of shape \(4, 5\) has 5 features.*\(3, 6\).*in_features=6"):
        kernels.linear(x[:, :5], w, b)
    with pytest.raises(ValueError, match=r"bias must have 1 dimension.*\(1, 3\)"):
        kernels.linear(x, w, b.unsqueeze(0))
    with pytest.raises(ValueError, match=r"bias of shape \(4,\) does not match weight of shape \(3, 6\)"):
        kernels.linear(x, w, torch.zeros(4, device=dev))
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but input has dtype torch.float32"):
        kernels.linear(x, w.double(), b)
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but input"):
        kernels.linear(x, w, b.double())
    with pytest.raises(ValueError, match=r"activation must be one of 'relu', 'none', 'sigmoid', 'tanh', got 'gelu'"):
        kernels.linear(x, w, b, "gelu")
    with pytest.raises(TypeError, match="input has dtype torch.int64"):
        kernels.linear(x.long(), w.long(), b.long())


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_on_the_cpu_runs_pytorch(dtype, activation):
    """bf16/fp16 CPU tensors, which the C++ kernels do not compute, run PyTorch's own ops (the
    torch backend) unless a backend is forced: FusedLinear equals nn.Linear + activation there,
    output and gradients, as it would run without this library."""
    torch.manual_seed(0)
    ours = kernels.FusedLinear(96, 80, activation=activation, dtype=dtype)
    theirs = nn.Linear(96, 80, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    act = {"relu": torch.relu, "tanh": torch.tanh}[activation]
    x = torch.randn(64, 96, dtype=dtype)
    assert kernels.backend_for(x) == "torch" and kernels.backend_for(x.float()) == "cpu"
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), act(theirs(xb))
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ya, yb, **tol)
    for a, b in [(xa.grad, xb.grad), (ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad)]:
        torch.testing.assert_close(a, b, **tol)


def test_unsupported_dtype_names_the_backend():
    kernels.set_backend("cpu")
    x, w, b = (t.half() for t in make(2, 3, 4, device="cpu"))
    with pytest.raises(TypeError, match="input has dtype torch.float16, the cpu backend supports float32, float64"):
        kernels.linear(x, w, b)


def test_device_mismatch():
    x, w, b = make(2, 3, 4, device="cpu")
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        kernels.linear(x, w.to("meta"), b)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="bias is on cuda:0 but input is on cpu"):
            kernels.linear(x, w, b.cuda())


# The three GEMMs of the layer as the TMA kernel runs them: forward y = act(x W^T + b) (B = W^T
# as stored), dx = dz W, and dW = dz^T x with db (A = dz^T as stored).
TMA_GEMMS = ["forward", "grad_input", "grad_weight"]


def _tma_gemm(gemm, x, w, b, y, dy, activation, num_programs):
    """Runs one GEMM of the layer through kernels.triton.linear.matmul_tma; returns its outputs."""
    from kernels.triton.linear import matmul_tma

    (M, K), N = x.shape, w.shape[0]
    if gemm == "forward":
        out = torch.full((M, N), float("nan"), device=x.device, dtype=x.dtype)
        matmul_tma(x, w.t(), out, bias=b, activation=activation, num_programs=num_programs)
        return (out,)
    if gemm == "grad_input":
        dx = torch.full((M, K), float("nan"), device=x.device, dtype=x.dtype)
        matmul_tma(dy, w, dx, y=y, grad_of=activation, num_programs=num_programs)
        return (dx,)
    dw = torch.full((N, K), float("nan"), device=x.device, dtype=x.dtype)
    db = torch.full((N,), float("nan"), device=x.device, dtype=x.dtype)
    matmul_tma(dy.t(), x, dw, y=y.t(), row_sum=db, grad_of=activation, num_programs=num_programs)
    return dw, db


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("gemm", TMA_GEMMS)
def test_tma_kernel(gemm, activation):
    """The persistent TMA kernel (large bf16/fp16 layers on Hopper) against PyTorch's autograd in
    float64: ragged M, N and K (partial tiles), more tiles than programs, x a strided view; on the
    CPU through the interpreter in fp32 and fp16 (it has no bf16), in bf16 and fp16 on a GPU."""
    from kernels.triton.linear import TMA_TILES

    block_m, block_n, block_k = TMA_TILES[gemm != "forward"][0][:3]
    # Every dimension a little over a tile: 2 x 2 output tiles (or more), 2+ steps along K.
    M, K, N = block_m + 8, block_k + block_n + 24, block_n + 16
    device = "cuda" if HAS_CUDA else "cpu"
    for dtype in (torch.bfloat16, torch.float16) if HAS_CUDA else (torch.float32, torch.float16):
        x, w, b = make(M, K, N, device=device, dtype=dtype)
        x = torch.cat([x, torch.zeros(M, 8, device=device, dtype=dtype)], 1)[:, :K]  # rows of K + 8: strided
        y = linear_reference(x, w, b, activation)
        dy = torch.randn_like(y)
        got = _tma_gemm(gemm, x, w, None if gemm == "grad_input" else b, y, dy, activation, None if HAS_CUDA else 3)
        x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
        y64 = linear_reference(x64, w64, b64, activation)
        want = (y64,) if gemm == "forward" else torch.autograd.grad(
            y64, (x64,) if gemm == "grad_input" else (w64, b64), dy.double())
        for g, ref in zip(got, want):
            error = (g.double() - ref).norm() / ref.norm()
            assert error < (1e-6 if dtype == torch.float32 else 1e-2), f"{dtype}: relative error {error:.2e}"


def test_tma_needs_aligned_unit_stride_rows():
    """Inputs a TMA descriptor cannot describe take the generic kernel."""
    from kernels.triton.linear import _tma_ready

    x = torch.randn(16, 40, dtype=torch.float16)
    assert _tma_ready(x)
    assert not _tma_ready(x[:, 1:])  # start not 16-byte aligned... and rows of 39
    assert not _tma_ready(torch.randn(16, 41, dtype=torch.float16))  # 82-byte rows
    assert not _tma_ready(x.t())  # stride 40 along the rows
    assert not _tma_ready(x[:0])


# ---------------------------------------------------------------------------------------------
# GPU only: compiled Triton in every dtype, the autotuned path, and PyTorch's fp32 precision.

@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# In bf16/fp16 on Hopper, 512x1000x384 takes the TMA kernel and 520x1001x392 the generic one (its
# rows of 1001 are not 16-byte aligned).
@pytest.mark.parametrize("shape", [(33, 70, 17), (64, 784, 128), (512, 1000, 384), (520, 1001, 392)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_dtypes(shape, dtype):
    kernels.set_backend("triton")
    x, w, b = make(*shape, device="cuda", dtype=dtype)
    check_against_nn(x, w, b, "relu")


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU")
def test_cuda_large_layers_take_the_tma_kernel(monkeypatch):
    """Forward, dx and dW of a large bf16 layer run on the TMA kernel, also when dy comes from
    y.sum() (stride 0, copied first); rows TMA cannot describe fall back to the generic kernel."""
    import kernels.triton.linear as triton_linear

    calls = []
    real = triton_linear.matmul_tma
    monkeypatch.setattr(triton_linear, "matmul_tma", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    for shape, expected in (((512, 1000, 384), 3), ((520, 1001, 392), 0)):
        for summed in (False, True):
            calls.clear()
            x, w, b = (t.requires_grad_() for t in make(*shape, device="cuda", dtype=torch.bfloat16))
            y = kernels.linear(x, w, b)
            if summed:
                y.sum().backward()
            else:
                y.backward(torch.randn_like(y))
            assert len(calls) == expected, (shape, summed)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_fp32_follows_matmul_precision(monkeypatch):
    """Full fp32 by default (TF32 would miss this tolerance at K=4096), TF32 only when allowed."""
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    x, w, b = make(256, 4096, 256, device="cuda")
    exact = F.linear(x.double(), w.double(), b.double()).relu()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert (kernels.linear(x, w, b).double() - exact).abs().max() < 1e-4
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert (kernels.linear(x, w, b).double() - exact).abs().max() < 3e-2


# ---------------------------------------------------------------------------------------------
# Triton launcher: PyTorch's fp32 matmul precision, the device guard, the kernel form and tiles by
# the chip's limits, autotuning by bucket and never inside a capture, NaN/inf through the
# activations. Through the interpreter (or compiled on a GPU), with faked CUDA calls where a test
# needs a GPU's answers.

class _KernelRecorder:
    """Stands in for a Triton kernel in a module: records each launch's keyword arguments, then
    launches the real kernel (or nothing, with ``run=False``)."""

    def __init__(self, kernel, run=True, on_launch=None):
        self.kernel, self.run, self.on_launch, self.launches = kernel, run, on_launch, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            if self.on_launch is not None:
                self.on_launch()
            if self.run:
                self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def matmul_precision():
    """Puts back PyTorch's fp32 matmul settings (the legacy one, then the new API's) after a test."""
    legacy = torch.get_float32_matmul_precision()
    owners = [torch.backends, torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None)]
    owners = [o for o in owners if hasattr(o, "fp32_precision")]  # torch >= 2.9
    saved = [o.fp32_precision for o in owners]
    yield
    torch.set_float32_matmul_precision(legacy)
    for owner, value in zip(owners, saved):
        owner.fp32_precision = value


def _set_precision(way):
    """Allows TF32 (or not) for fp32 matmuls the way ``way`` names."""
    if way.startswith("set_float32_matmul_precision"):
        torch.set_float32_matmul_precision(way.split(":")[1])
    elif way == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif way == "cuda.matmul.fp32_precision":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif way == "fp32_precision":  # the generic setting: cuda.matmul's "none" defers to it
        torch.backends.fp32_precision = "tf32"
    elif way == "fp32_precision, cuda.matmul ieee":
        torch.backends.fp32_precision = "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"


_NEW_API = hasattr(torch.backends, "fp32_precision")


@pytest.mark.parametrize("way,expected", [
    ("default", "ieee"), ("set_float32_matmul_precision:high", "tf32"), ("set_float32_matmul_precision:medium", "tf32"),
    ("set_float32_matmul_precision:highest", "ieee"), ("allow_tf32", "tf32"),
    pytest.param("cuda.matmul.fp32_precision", "tf32", marks=pytest.mark.skipif(not _NEW_API, reason="torch < 2.9")),
    pytest.param("fp32_precision", "tf32", marks=pytest.mark.skipif(not _NEW_API, reason="torch < 2.9")),
    pytest.param("fp32_precision, cuda.matmul ieee", "ieee", marks=pytest.mark.skipif(not _NEW_API, reason="torch < 2.9")),
])
def test_triton_fp32_dot_precision_follows_torch(monkeypatch, matmul_precision, way, expected):
    """The fp32 GEMM's dots are TF32 exactly when PyTorch's own fp32 matmul would be, whichever API
    allowed it (reading the legacy allow_tf32 after the new API raises on torch >= 2.9); other
    dtypes always get ieee."""
    import kernels.triton.linear as triton_linear

    recorder = _KernelRecorder(triton_linear._fused_matmul_kernel)
    monkeypatch.setattr(triton_linear, "_fused_matmul_kernel", recorder)
    kernels.set_backend("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    _set_precision(way)
    for dtype in (torch.float32, torch.float64):
        x, w, b = make(3, 4, 2, device=device, dtype=dtype)
        kernels.linear(x, w, b)
    assert [launch["DOT_PRECISION"] for launch in recorder.launches] == [expected, "ieee"]


def test_device_guard_switches_only_when_needed(monkeypatch):
    """Kernels launch on the current GPU: the guard makes the tensor's GPU current, and costs
    nothing (no context) when it already is, or for a CPU tensor."""
    from types import SimpleNamespace

    from kernels.triton.utils import device_guard

    entered = []

    class FakeDeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    for name in ("cuda:1", "cuda:0", "cpu"):
        device = torch.device(name)
        with device_guard(SimpleNamespace(is_cuda=device.type == "cuda", device=device)):
            pass
    assert entered == [torch.device("cuda:1")]


def test_every_triton_linear_launch_is_device_guarded(monkeypatch):
    """The forward and both backward GEMMs launch inside device_guard of the layer's tensors."""
    import kernels.triton.linear as triton_linear

    guarded, inside = [], []

    @contextlib.contextmanager
    def guard(t):
        guarded.append(t.device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    recorder = _KernelRecorder(triton_linear._fused_matmul_kernel, on_launch=lambda: guarded.append(bool(inside)))
    monkeypatch.setattr(triton_linear, "device_guard", guard)
    monkeypatch.setattr(triton_linear, "_fused_matmul_kernel", recorder)
    kernels.set_backend("triton")
    x, w, b = (t.requires_grad_() for t in make(5, 4, 3, device="cuda" if HAS_CUDA else "cpu"))
    kernels.linear(x, w, b).sum().backward()
    # forward: guard, y; backward: guard, dx, dW with db
    assert guarded == [x.device, True, x.device, True, True]


def test_tma_refuses_rows_it_cannot_describe():
    """Stride-0 rows (y.sum() and y.sum(0) hand the backward such a dy) overlap: TMA cannot describe
    them, as stored or transposed; a transposed view of a ready tensor is read as stored."""
    from kernels.triton.linear import _tma_ready, _tma_view

    summed = torch.ones(1, 1, dtype=torch.float16).expand(64, 64)
    summed_rows = torch.randn(1, 64, dtype=torch.float16).expand(64, 64)
    assert summed.stride() == (0, 0) and summed_rows.stride() == (0, 1)
    for dy in (summed, summed_rows):
        assert not _tma_ready(dy) and _tma_view(dy) is None
    x = torch.randn(64, 32, dtype=torch.float16)
    assert _tma_view(x) == (x, False)
    stored, transposed = _tma_view(x.t())
    assert transposed and stored.data_ptr() == x.data_ptr() and stored.shape == x.shape


# compute capability major, shared memory per block (opt-in), multiprocessors
_CHIPS = {"H100": (9, 232448, 132), "RTX 5090 (sm_120)": (12, 101376, 170), "A100": (8, 166912, 108)}


@pytest.fixture
def fake_gpus(monkeypatch):
    """cuda:0, 1, 2 answer torch.cuda.get_device_properties as an H100, a consumer Blackwell and an A100."""
    from types import SimpleNamespace

    import kernels.triton.linear as triton_linear

    props = [SimpleNamespace(major=major, shared_memory_per_block_optin=shared, multi_processor_count=sms)
             for major, shared, sms in _CHIPS.values()]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])
    triton_linear._chip.cache_clear()
    yield [torch.device("cuda", i) for i in range(len(props))]
    triton_linear._chip.cache_clear()


def test_kernel_form_and_tiles_follow_the_chip(fake_gpus):
    """The TMA kernel only where the chip has the copy engine (compute capability 9+) and its
    shared memory holds a TMA tile: the H100, not consumer Blackwell's 99 KB (every TMA tile needs
    more) nor the A100; each chip autotunes only over the tiles that fit it."""
    from kernels.triton.linear import (GENERIC_TILES, SMALL_PROBLEM, SMALL_TILE, TMA_TILES, _tma_kernel_fits,
                                       fitting_tiles, shared_memory)

    h100, blackwell, a100 = fake_gpus
    large = 4096 ** 3
    for prologue in (False, True):
        assert _tma_kernel_fits(h100, torch.bfloat16, large, prologue)
        assert _tma_kernel_fits(h100, torch.float16, large, prologue)
        assert not _tma_kernel_fits(h100, torch.float32, large, prologue)
        assert not _tma_kernel_fits(h100, torch.bfloat16, SMALL_PROBLEM, prologue)
        assert not _tma_kernel_fits(blackwell, torch.bfloat16, large, prologue)
        assert not _tma_kernel_fits(a100, torch.bfloat16, large, prologue)
        assert fitting_tiles(True, torch.bfloat16, prologue, h100) == TMA_TILES[prologue]
        assert fitting_tiles(True, torch.bfloat16, prologue, blackwell) == []
        for dtype in (torch.bfloat16, torch.float32):
            size = dtype.itemsize
            table = GENERIC_TILES[(size, prologue)]
            assert fitting_tiles(False, dtype, prologue, h100) == table  # the tables are sm_90's
            fits = [t for t in table if shared_memory(t, size, prologue, False) <= 101376]
            assert fitting_tiles(False, dtype, prologue, blackwell) == (fits or [SMALL_TILE])
    assert (128, 256, 64, 3, 8) not in fitting_tiles(False, torch.bfloat16, False, blackwell)  # 146 KB
    assert (128, 128, 32, 4, 4) in fitting_tiles(False, torch.bfloat16, False, blackwell)  # 66 KB
    # fp32 with the prologue: no tile of its table fits 99 KB; the small-problem tile does
    assert fitting_tiles(False, torch.float32, True, blackwell) == [SMALL_TILE]
    assert shared_memory(SMALL_TILE, 4, True, False) <= 101376


def test_autotuning_is_bucketed_and_never_inside_a_capture(monkeypatch):
    """Large GEMMs share an autotuner per power-of-two bucket of M and K, so a new batch size in a
    tuned bucket times nothing; a shape first seen inside a CUDA graph capture raises a clear error
    before anything launches."""
    import kernels.triton.linear as triton_linear

    autotuners = []
    recorder = _KernelRecorder(None, run=False)
    monkeypatch.setattr(triton_linear, "_autotuned", lambda *key: autotuners.append(key) or recorder)
    monkeypatch.setattr(triton_linear, "_tuned_keys", set())
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])

    def gemm(M, N=256, K=200):
        x, w = torch.randn(M, K), torch.randn(N, K)
        assert M * N * K > triton_linear.SMALL_PROBLEM
        triton_linear.matmul(x, w.t(), torch.empty(M, N), activation="relu")

    capturing[0] = True
    with pytest.raises(RuntimeError, match="M=300, N=256, K=200 .* inside a CUDA graph capture.*warm-up"):
        gemm(300)
    assert recorder.launches == []
    capturing[0] = False
    gemm(300)
    capturing[0] = True
    gemm(500)  # the same buckets (512, 256): tuned already
    with pytest.raises(RuntimeError, match="M=600"):
        gemm(600)  # M's next bucket
    with pytest.raises(RuntimeError, match="N=257"):
        gemm(500, N=257)
    assert len(recorder.launches) == 2
    assert [key[4:] for key in autotuners] == [(512, 256), (512, 256)]


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_triton_activations_propagate_nan_and_saturate_at_inf(activation):
    """NaN and +-inf through the forward and backward as torch gives them: relu keeps NaN (max would
    drop it) and passes a NaN output's gradient (threshold_backward's y <= 0 ? 0 : dy); sigmoid
    and tanh saturate at +-inf with zero gradient."""
    kernels.set_backend("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    values = [float("nan"), float("inf"), float("-inf"), 2.0, -3.0, 0.0]
    x = torch.tensor(values, device=device).unsqueeze(1).requires_grad_()
    w = torch.ones(1, 1, device=device, requires_grad=True)
    b = torch.zeros(1, device=device, requires_grad=True)
    y = kernels.linear(x, w, b, activation)
    y.backward(torch.ones_like(y))
    x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y_ref = ACTIVATIONS[activation]()(F.linear(x_ref, w_ref, b_ref))
    y_ref.backward(torch.ones_like(y_ref))
    for ours, theirs in ((y, y_ref), (x.grad, x_ref.grad), (w.grad, w_ref.grad), (b.grad, b_ref.grad)):
        torch.testing.assert_close(ours, theirs, equal_nan=True)
