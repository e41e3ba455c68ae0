"""kernels.cross_entropy / FusedCrossEntropyLoss against PyTorch's F.cross_entropy / nn.CrossEntropyLoss:
loss and gradient, on every backend (C++ and Triton, the latter interpreted on CPU in CI).

The oracle is PyTorch's own function evaluated in float64 on the same values, so that a float32
kernel is judged by its own error, not by PyTorch's float32 rounding.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from tests.conftest import HAS_CUDA, Backend, _backends

# Triton's interpreter evaluates masked-off lanes too (e.g. exp(-inf - -inf)); their NaNs are discarded.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

REDUCTIONS = ("none", "sum", "mean")
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=5e-3, atol=5e-4)}


def _dtype(backend):
    return torch.float64 if backend.device.type == "cpu" else torch.float32


def _run(fn, logits, target, grad_out=None, **kw):
    """(loss, dlogits) of fn(logits, target, **kw); grad_out weights the loss (ones by default)."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, **kw)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    loss.backward(g)
    return loss.detach(), x.grad


def _oracle(logits, target, grad_out=None, **kw):
    """PyTorch's own F.cross_entropy, in float64."""
    if kw.get("weight") is not None:
        kw = dict(kw, weight=kw["weight"].double())
    loss, grad = _run(F.cross_entropy, logits.double(), target, None if grad_out is None else grad_out.double(), **kw)
    return loss, grad


def _check(logits, target, grad_out=None, tol=None, **kw):
    loss, grad = _run(kernels.cross_entropy, logits, target, grad_out, **kw)
    want_loss, want_grad = _oracle(logits.cpu(), target.cpu(), None if grad_out is None else grad_out.cpu(),
                                   **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    tol = tol or TOL[logits.dtype]
    assert loss.dtype == logits.dtype and loss.shape == want_loss.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.cpu().double(), want_loss, equal_nan=True, **tol)
    torch.testing.assert_close(grad.cpu().double(), want_grad, equal_nan=True, **tol)


def _inputs(N, C, device, dtype, scale=3.0, ignore=False):
    logits = (torch.randn(N, C, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    target = torch.randint(0, C, (N,), device=device)
    if ignore:
        target[::3] = -100
    return logits, target


# --------------------------------------------------------------------------------------------
# Semantics against PyTorch

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_cpu_isa(cpu_isa, dtype):
    """The AVX-512, AVX2 and portable builds of the C++ kernel against F.cross_entropy: short and
    streamed rows, weights with smoothing, ignored rows."""
    for N, C in [(12, 10), (5, 1000)]:
        logits, target = _inputs(N, C, "cpu", dtype, ignore=True)
        weight = torch.rand(C, dtype=dtype) + 0.5
        _check(logits, target)
        _check(logits, target, weight=weight, label_smoothing=0.1)
        _check(logits, target, reduction="none", label_smoothing=0.2)
        if dtype == torch.float32:
            _assert_as_precise_as_pytorch(logits + 1e6, target)


# On Triton: 12 x 37 takes the one-program kernel for small batches, 1500 the per-row kernel with
# the row in one block, 9000 the per-row kernel streaming the row.
ROW_KINDS = dict(argvalues=[37, 1500, 9000], ids=["small-batch", "short-row", "streamed-row"])


@pytest.mark.parametrize("C", **ROW_KINDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("ignore", [False, True], ids=["", "ignore"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_pytorch(backend, reduction, weighted, ignore, label_smoothing, C):
    N = 12 if C < 1000 else 4
    dtype = _dtype(backend)
    logits, target = _inputs(N, C, backend.device, dtype, ignore=ignore)
    weight = torch.rand(C, dtype=dtype, device=backend.device) + 0.1 if weighted else None
    _check(logits, target, weight=weight, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("N,C", [(64, 2), (64, 10), (16, 1000), (4, 32000), (2, 131072)])
def test_class_counts(backend, N, C):
    logits, target = _inputs(N, C, backend.device, torch.float32, ignore=True)
    weight = torch.rand(C, device=backend.device) + 0.5
    _check(logits, target, weight=weight, label_smoothing=0.1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("C", **ROW_KINDS)
def test_extreme_logits(backend, C, label_smoothing):
    """+-1e4 logits, -inf entries, a row that is -inf everywhere but at its target, a row of equal
    huge logits: the same losses (inf included) and gradients as PyTorch."""
    dtype = _dtype(backend)
    logits, target = _inputs(5, C, "cpu", dtype)
    logits[0, ::7] = 1e4
    logits[0, 3::11] = -1e4
    logits[1, ::4] = float("-inf")
    target[1] = 1
    logits[2] = float("-inf")
    logits[2, target[2]] = -5.0
    logits[3] = 1e4
    logits[4] = -1e4
    logits[4, target[4]] = 1e4
    _check(logits.to(backend.device), target.to(backend.device), reduction="none",
           label_smoothing=label_smoothing)
    _check(logits.to(backend.device), target.to(backend.device), label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched(backend, reduction):
    dtype = _dtype(backend)
    logits = torch.randn(11, dtype=dtype, device=backend.device)
    target = torch.tensor(4, device=backend.device)
    _check(logits, target, reduction=reduction, weight=torch.rand(11, dtype=dtype, device=backend.device),
           label_smoothing=0.1)


@pytest.mark.parametrize("ignore", [False, True], ids=["", "ignore"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_dimensional(backend, reduction, ignore):
    """(N, C, d1, ..., dk) logits with (N, d1, ..., dk) targets, as nn.CrossEntropyLoss takes them
    (a sequence or an image of positions, each a row of C logits): loss ("none": the target's
    shape) and gradient, with weights and smoothing, one and two extra axes."""
    dtype = _dtype(backend)
    dev = backend.device
    for shape in [(4, 11, 3), (2, 7, 3, 5), (3, 6, 1)]:
        logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dev, dtype)
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=dev)
        if ignore:
            target.view(-1)[::4] = -100
        weight = torch.rand(shape[1], dtype=dtype, device=dev) + 0.1
        _check(logits, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        _check(logits, target, reduction=reduction)


def test_k_dimensional_retain_graph_double_backward_and_inplace(backend):
    """The paths that compute the gradient again from the logits move their class axis as the
    first one did; inplace_backward writes over the class-last copy, so the caller's logits keep
    their values and the gradient is still right."""
    dtype = _dtype(backend)
    logits = torch.randn(3, 6, 4, dtype=dtype, device=backend.device)
    target = torch.randint(0, 6, (3, 4), device=backend.device)
    x, ref = logits.clone().requires_grad_(), logits.double().clone().requires_grad_()
    loss = kernels.cross_entropy(x, target, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    loss.backward()
    F.cross_entropy(ref, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(x.grad.double(), 2 * ref.grad, **TOL[dtype])
    g, = torch.autograd.grad(kernels.cross_entropy(x, target), x, create_graph=True)
    g_ref, = torch.autograd.grad(F.cross_entropy(ref, target), ref, create_graph=True)
    h, = torch.autograd.grad((g * g).sum(), x)
    h_ref, = torch.autograd.grad((g_ref * g_ref).sum(), ref)
    torch.testing.assert_close(h.double(), h_ref, **TOL[dtype])
    y = logits.clone().requires_grad_()
    kernels.FusedCrossEntropyLoss(inplace_backward=True)(y, target).backward()
    torch.testing.assert_close(y.grad.double(), torch.autograd.grad(F.cross_entropy(ref, target), ref)[0], **TOL[dtype])
    assert torch.equal(y.detach(), logits)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets(backend, reduction):
    """Targets of class probabilities (floating, shaped like the logits) are computed by
    F.cross_entropy itself: the same loss and gradient, through the function, the module and a
    criterion converted by kernels.fuse."""
    dtype = _dtype(backend)
    dev = backend.device
    for shape in [(5, 9), (9,), (2, 9, 3)]:
        logits = torch.randn(shape, dtype=dtype, device=dev)
        probs = torch.softmax(torch.randn(shape, dtype=dtype, device=dev), dim=0 if len(shape) == 1 else 1)
        weight = torch.rand(9, dtype=dtype, device=dev) + 0.1
        kw = dict(weight=weight, reduction=reduction, label_smoothing=0.2)
        want = _run(F.cross_entropy, logits, probs, **kw)
        for fn in (kernels.cross_entropy, kernels.FusedCrossEntropyLoss(**kw),
                   kernels.fuse(nn.CrossEntropyLoss(**kw))):
            got = _run(fn, logits, probs, **(kw if fn is kernels.cross_entropy else {}))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)


def test_upstream_gradient(backend):
    """grad_output != 1: a scaled mean, a random per-row upstream gradient, and the expanded
    (stride 0) ones that loss.sum() hands to a "none" reduction."""
    dtype = _dtype(backend)
    logits, target = _inputs(9, 300, backend.device, dtype, ignore=True)
    _check(logits, target, grad_out=torch.tensor(3.0, dtype=dtype, device=backend.device))
    _check(logits, target, grad_out=torch.randn(9, dtype=dtype, device=backend.device), reduction="none",
           label_smoothing=0.1)
    _check(logits, target, grad_out=torch.ones((), dtype=dtype, device=backend.device).expand(9),
           reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    dtype = _dtype(backend)
    logits = torch.empty(0, 7, dtype=dtype, device=backend.device)
    _check(logits, torch.empty(0, dtype=torch.long, device=backend.device), reduction=reduction)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, reduction, weighted):
    """Every target ignored: "mean" is NaN (0/0) and the gradient 0, as in PyTorch."""
    dtype = _dtype(backend)
    logits, _ = _inputs(6, 20, backend.device, dtype)
    target = torch.full((6,), 5, device=backend.device)
    weight = torch.rand(20, dtype=dtype, device=backend.device) if weighted else None
    _check(logits, target, weight=weight, ignore_index=5, reduction=reduction, label_smoothing=0.1)


def test_zero_total_weight(backend):
    """Targets whose weights are all 0: PyTorch's weighted mean is 0/0 and so is ours."""
    dtype = _dtype(backend)
    logits, _ = _inputs(4, 6, backend.device, dtype)
    weight = torch.tensor([0, 0, 1, 1, 1, 1], dtype=dtype, device=backend.device)
    _check(logits, torch.tensor([0, 1, 1, 0], device=backend.device), weight=weight)


def test_target_dtypes(backend):
    dtype = _dtype(backend)
    logits, target = _inputs(8, 13, backend.device, dtype)
    want, _ = _run(kernels.cross_entropy, logits, target)
    for t in (torch.int32, torch.uint8):
        got, _ = _run(kernels.cross_entropy, logits, target.to(t))
        torch.testing.assert_close(got, want)


def test_strided_inputs(backend):
    """Every tensor argument is read with its own strides: a column of a label matrix and an
    expanded (stride 0) target, transposed logits, a strided weight."""
    dtype = _dtype(backend)
    dev = backend.device
    labels = torch.randint(0, 13, (8, 3), device=dev)
    logits_t = (torch.randn(13, 8, dtype=torch.float64) * 3).to(dev, dtype)
    weight = torch.rand(26, dtype=dtype, device=dev)[::2] + 0.5
    for target in (labels[:, 0], labels[:, 2], torch.tensor([2], device=dev).expand(8)):
        assert not target.is_contiguous()
        _check(logits_t.t(), target, weight=weight, label_smoothing=0.1)
        _check(logits_t.t(), target, reduction="none")
    _check(logits_t[:, 0], labels[0, 1], weight=weight)  # unbatched, strided logits


def _nonfinite_logits(C, device, dtype):
    """Rows with a NaN, a +inf, only -inf, some -inf, a huge finite logit, and plain ones."""
    logits = (torch.randn(6, C, dtype=torch.float64) * 3).to(dtype)
    logits[0, C // 2] = float("nan")
    logits[1, C // 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, 1::2] = float("-inf")
    logits[4, 5] = 3e30 if dtype != torch.float64 else 1e300
    return logits.to(device)


@pytest.mark.parametrize("C", **ROW_KINDS)
@pytest.mark.parametrize("ignored", [False, True], ids=["", "ignored"])
def test_nan_and_inf(backend, C, ignored):
    """NaN and inf logits give PyTorch's loss and gradient, on counted rows and on ignored rows
    (whose gradient is NaN where the row's softmax is: a NaN or +inf logit, or all -inf)."""
    dtype = _dtype(backend)
    logits = _nonfinite_logits(C, backend.device, dtype)
    target = torch.tensor([0, 2, 4, 6, 8, 1], device=backend.device)  # row 3's target is a finite logit
    if ignored:
        target[:5] = -100
    for kw in ({}, dict(label_smoothing=0.1), dict(weight=torch.rand(C, dtype=dtype, device=backend.device) + 0.5)):
        _check(logits, target, reduction="none", **kw)
        _check(logits, target, **kw)


def _assert_as_precise_as_pytorch(logits, target):
    """The loss and gradient errors of float32 logits (against float64 on the same values) are
    within a few times PyTorch float32's own."""
    kw = dict(reduction="none", label_smoothing=0.1)
    exact_loss, exact_grad = _oracle(logits.cpu(), target.cpu(), **kw)
    errors = {}
    for ce in (kernels.cross_entropy, F.cross_entropy):
        loss, grad = _run(ce, logits, target, **kw)
        errors[ce] = ((loss.cpu().double() - exact_loss).abs().max(), (grad.cpu().double() - exact_grad).abs().max())
    for ours, torchs in zip(errors[kernels.cross_entropy], errors[F.cross_entropy]):
        assert ours <= 4 * torchs + 1e-6, errors


@pytest.mark.parametrize("magnitude", [1e4, 1e6])
@pytest.mark.parametrize("C", **ROW_KINDS)
def test_large_logits_precision(backend, C, magnitude):
    """Logits near 1e4 and 1e6 in float32 are as precise as PyTorch's: the loss and gradient are
    formed from x - max, as log_softmax's are (not from the log-sum-exp, whose rounding grows
    with the logits)."""
    N = 6 if C < 1000 else 2
    logits = (magnitude + torch.randn(N, C, dtype=torch.float64) * 3).float().to(backend.device)
    _assert_as_precise_as_pytorch(logits, torch.randint(0, C, (N,), device=backend.device))


def test_no_grad_forward(backend):
    """Without autograd no gradient is written; the loss is the same."""
    dtype = _dtype(backend)
    logits, target = _inputs(5, 9000, backend.device, dtype)
    want, _ = _oracle(logits.cpu(), target.cpu(), label_smoothing=0.1)
    with torch.no_grad():
        got = kernels.cross_entropy(logits.clone().requires_grad_(), target, label_smoothing=0.1)
    torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype])
    assert got.grad_fn is None
    torch.testing.assert_close(kernels.cross_entropy(logits, target, label_smoothing=0.1).cpu().double(), want,
                               **TOL[dtype])


@pytest.mark.parametrize("C", **ROW_KINDS)
def test_inplace_backward(backend, C):
    """inplace_backward writes the gradient over the logits: the upstream gradient is still right
    and the logits buffer now holds dlogits."""
    dtype = _dtype(backend)
    a = torch.randn(6, 16, dtype=dtype, device=backend.device, requires_grad=True)
    b = torch.randn(16, C, dtype=dtype, device=backend.device)
    target = torch.randint(0, C, (6,), device=backend.device)
    a_ref = a.detach().double().requires_grad_()
    F.cross_entropy(a_ref @ b.double(), target, label_smoothing=0.1).backward()

    logits = a @ b
    loss = kernels.FusedCrossEntropyLoss(label_smoothing=0.1, inplace_backward=True)(logits, target)
    loss.backward()
    torch.testing.assert_close(a.grad.double(), a_ref.grad, **TOL[dtype])
    x = (a_ref.detach() @ b.double()).requires_grad_()
    F.cross_entropy(x, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(logits.detach().double(), x.grad, **TOL[dtype])


def test_inplace_backward_on_a_leaf(backend):
    """For leaf logits, inplace_backward leaves the gradient in the logits' own memory: .grad is
    right and is no copy (a copy would be the second (N, C) buffer the option exists to avoid)."""
    dtype = _dtype(backend)
    logits, target = _inputs(8, 300, backend.device, dtype)
    x = logits.clone().requires_grad_()
    F.cross_entropy(x, target).backward()
    leaf = logits.clone().requires_grad_()
    kernels.cross_entropy(leaf, target, inplace_backward=True).backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, x.grad, **TOL[dtype])


@pytest.mark.parametrize("layer", ["FusedLinear", "nn.ReLU"])
def test_inplace_backward_after_a_layer_that_saved_the_logits(backend, layer):
    """inplace_backward overwrites logits that FusedLinear(relu) or nn.ReLU saved for their own
    backward: autograd raises its usual error instead of computing with the gradient."""
    dtype = _dtype(backend)
    x = torch.randn(6, 5, dtype=dtype, device=backend.device)
    target = torch.randint(0, 10, (6,), device=backend.device)
    if layer == "FusedLinear":
        model = kernels.FusedLinear(5, 10, activation="relu").to(backend.device, dtype)
    else:
        model = nn.Sequential(nn.Linear(5, 10), nn.ReLU()).to(backend.device, dtype)
    loss = kernels.cross_entropy(model(x), target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    kernels.cross_entropy(model(x), target).backward()  # without inplace_backward it is fine


@pytest.mark.parametrize("N,C,kernels_run", [(64, 10, ["small batch", "scale grad"]),
                                             (4, 32000, ["target stats", "rows", "scale grad"])])
def test_triton_launches(monkeypatch, N, C, kernels_run):
    """Forward and backward: a small batch is one launch of the one-program kernel, a large one
    the statistics and the per-row kernel; the backward is one launch (see the Triton module
    for why it remains when grad_output is 1); a forward without autograd launches no more."""
    import kernels.triton.cross_entropy as triton_ce

    launched = []

    class Recorder:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for attr, name in (("_small_cross_entropy_kernel", "small batch"), ("_target_stats_kernel", "target stats"),
                       ("_cross_entropy_kernel", "rows"), ("_scale_grad_kernel", "scale grad")):
        monkeypatch.setattr(triton_ce, attr, Recorder(getattr(triton_ce, attr), name))
    kernels.set_backend("triton")
    logits, target = _inputs(N, C, "cuda" if HAS_CUDA else "cpu", torch.float32)
    _check(logits, target)
    assert launched == kernels_run
    launched.clear()
    kernels.cross_entropy(logits, target)
    assert launched == kernels_run[:-1]


def test_torch_compile(backend):
    """kernels.cross_entropy compiles in one graph (its custom ops), alone and after a model, with
    the backward (and its in-place scaling) in the compiled graph: the results are eager's."""
    torch._dynamo.reset()
    dev = backend.device
    dtype = _dtype(backend)
    logits, target = _inputs(8, 10, dev, dtype, ignore=True)
    weight = torch.rand(10, dtype=dtype, device=dev) + 0.5

    def loss_of(x, t):
        return kernels.cross_entropy(x, t, weight, label_smoothing=0.1)

    compile_args = dict(backend="aot_eager" if dev.type == "cpu" else "inductor", fullgraph=True)
    torch.testing.assert_close(torch.compile(loss_of, **compile_args)(logits, target), loss_of(logits, target))
    got = _run(torch.compile(loss_of, **compile_args), logits, target, grad_out=torch.tensor(2.0))
    torch.testing.assert_close(got, _run(loss_of, logits, target, grad_out=torch.tensor(2.0)))

    torch.manual_seed(0)
    model = nn.Sequential(kernels.FusedLinear(12, 16), kernels.FusedLinear(16, 10, activation="none")).to(dev, dtype)
    criterion = kernels.FusedCrossEntropyLoss(reduction="sum")
    x = torch.randn(8, 12, dtype=dtype, device=dev)
    grads = []
    for fn in (torch.compile(lambda x, t: criterion(model(x), t), **compile_args), lambda x, t: criterion(model(x), t)):
        model.zero_grad()
        loss = fn(x, target)
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_of_a_tiny_cpu_loss():
    """The small-CPU path (F.cross_entropy behind our checks and its try) traces in one graph."""
    torch._dynamo.reset()
    logits, target = _inputs(8, 10, "cpu", torch.float32, ignore=True)
    loss_of = lambda x, t: kernels.cross_entropy(x, t, label_smoothing=0.1)  # noqa: E731
    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_run(compiled, logits, target), _run(F.cross_entropy, logits, target, label_smoothing=0.1))


def test_retain_graph(backend):
    """A second backward through the same graph recomputes the gradient from the logits; it
    raises once they are gone or were overwritten by inplace_backward."""
    dtype = _dtype(backend)
    logits, target = _inputs(4, 30, backend.device, dtype)
    x = logits.clone().requires_grad_()
    loss = kernels.cross_entropy(x, target, reduction="sum")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(2.0, dtype=dtype, device=backend.device))
    torch.testing.assert_close(g2, 2 * g1)

    x = logits.clone().requires_grad_()
    loss = kernels.cross_entropy(x * 1, target, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def _double_backward(ce, logits, target, v, **kw):
    """(loss + ||dloss/dx||^2, its gradient, the Hessian-vector product H v) of ce at x = logits."""
    x = logits.detach().clone().requires_grad_()
    loss = ce(x, target, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    total = loss.sum() + (g * g).sum()
    (d_total,) = torch.autograd.grad(total, x, retain_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    return total.detach(), d_total, hv


@pytest.mark.parametrize("C", **ROW_KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward(backend, reduction, C):
    """create_graph=True gives a gradient that is differentiable again: a gradient penalty
    (loss + ||dloss/dx||^2) and a Hessian-vector product match PyTorch's."""
    N = 6 if C < 1000 else 2
    dtype = _dtype(backend)
    logits, target = _inputs(N, C, backend.device, dtype, ignore=True)
    v = torch.randn(N, C, dtype=dtype, device=backend.device)
    kw = dict(weight=torch.rand(C, dtype=dtype, device=backend.device) + 0.5, label_smoothing=0.1, reduction=reduction)
    got = _double_backward(kernels.cross_entropy, logits, target, v, **kw)
    kw64 = dict(kw, weight=kw["weight"].double())
    want = _double_backward(F.cross_entropy, logits.double(), target, v.double(), **kw64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL[dtype])


def test_gradient_penalty_through_a_model(backend):
    """The gradient penalty of a small model's input through its loss, back to the model's
    parameters, as PyTorch computes it; when the logits are gone by then, a clear error."""
    dtype = _dtype(backend)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 7)).to(backend.device, dtype)
    inputs = torch.randn(8, 5, dtype=dtype, device=backend.device)
    target = torch.randint(0, 7, (8,), device=backend.device)

    def penalised(ce):
        x = inputs.clone().requires_grad_()
        logits = model(x)
        loss = ce(logits, target)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(loss + (g * g).sum(), list(model.parameters()))

    for ours, theirs in zip(penalised(kernels.cross_entropy), penalised(F.cross_entropy)):
        torch.testing.assert_close(ours, theirs, **TOL[dtype])
    x = inputs.clone().requires_grad_()
    loss = kernels.cross_entropy(model(x), target)  # the logits die with the call
    with pytest.raises(RuntimeError, match="create_graph=True.*keep a reference to the logits"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_module(backend):
    """FusedCrossEntropyLoss takes nn.CrossEntropyLoss's arguments, keeps weight as a buffer and has
    its state_dict."""
    dtype = _dtype(backend)
    weight = torch.rand(10, dtype=dtype, device=backend.device)
    ours = kernels.FusedCrossEntropyLoss(weight=weight, ignore_index=3, reduction="sum", label_smoothing=0.05)
    theirs = nn.CrossEntropyLoss(weight=weight.double(), ignore_index=3, reduction="sum", label_smoothing=0.05)
    assert isinstance(ours, nn.CrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert "weight" in dict(ours.named_buffers())
    logits, target = _inputs(7, 10, backend.device, dtype)
    target[0] = 3
    torch.testing.assert_close(ours(logits, target).cpu().double(), theirs(logits.double(), target).cpu(),
                               **TOL[dtype])
    with pytest.warns(UserWarning, match="size_average"):
        legacy = kernels.FusedCrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    assert "inplace_backward=True" in repr(kernels.FusedCrossEntropyLoss(inplace_backward=True))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_cpp(reduction, monkeypatch):
    """First and second derivatives (the latter also with respect to grad_output) by finite differences."""
    kernels.set_backend("cpu")
    target = torch.tensor([0, 6, -100, 3, 3])
    for n_cls in (7, 300):  # a short row and a streamed one
        logits = torch.randn(5, n_cls, dtype=torch.float64, requires_grad=True)
        weight = torch.rand(n_cls, dtype=torch.float64) + 0.2

        def loss(x):
            return kernels.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1)

        assert torch.autograd.gradcheck(loss, (logits,))
        if n_cls < 100:  # a Hessian of 1500 x 1500 entries takes minutes
            assert torch.autograd.gradgradcheck(loss, (logits,))


def test_torch_reference_backend(monkeypatch):
    """KERNELS_BACKEND=torch (the plain-PyTorch reference of the kernels) also matches F.cross_entropy."""
    kernels.set_backend("torch")
    for reduction in REDUCTIONS:
        logits, target = _inputs(6, 40, "cpu", torch.float64, ignore=True)
        _check(logits, target, weight=torch.rand(40, dtype=torch.float64), reduction=reduction,
               label_smoothing=0.1)
    with pytest.raises(ValueError, match="out of range"):
        kernels.cross_entropy(torch.randn(2, 3), torch.tensor([0, 3]))


def test_tiny_cpu_losses_run_pytorchs_op_unless_forced_or_inplace(monkeypatch):
    """Below SMALL_CPU_LOGITS a CPU call runs F.cross_entropy itself (loss and gradient equal to
    it to the bit, every option, K-dimensional logits included) and still names a bad target's row;
    at or above it, with inplace_backward, or with the backend forced to "cpu", the C++ kernel runs."""
    from kernels.cpu import cross_entropy as cpu_cross_entropy
    from kernels.ops.cross_entropy import SMALL_CPU_LOGITS

    launches = []
    forward = cpu_cross_entropy.forward
    monkeypatch.setattr(cpu_cross_entropy, "forward", lambda *a: launches.append(1) or forward(*a))
    assert kernels.get_backend() is None and 64 * 10 < SMALL_CPU_LOGITS
    cases = [((64, 10), (64,), {}),
             ((6, 5), (6,), dict(weight=torch.rand(5), ignore_index=2, label_smoothing=0.1, reduction="sum")),
             ((3, 5, 4), (3, 4), dict(reduction="none")),
             ((5,), (), dict(label_smoothing=0.3))]
    for shape, target_shape, kw in cases:
        logits = torch.randn(shape)
        target = torch.randint(0, 5 if len(shape) > 1 else shape[0], target_shape)
        ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss, want = kernels.cross_entropy(ours, target, **kw), F.cross_entropy(theirs, target, **kw)
        loss.backward(torch.ones_like(loss))
        want.backward(torch.ones_like(want))
        assert torch.equal(loss, want) and torch.equal(ours.grad, theirs.grad)
    assert not launches
    with pytest.raises(ValueError, match=r"target\[5\] = 7 is out of range for 4 classes"):
        kernels.cross_entropy(torch.randn(2, 4, 3), torch.tensor([[0, 1, 2], [3, -100, 7]]))
    with pytest.raises(ValueError, match=r"target of shape \(3,\) does not match logits of shape \(2, 4\)"):
        kernels.cross_entropy(torch.randn(2, 4), torch.zeros(3, dtype=torch.long))
    assert not launches

    x, target = torch.randn(64, 10, requires_grad=True), torch.randint(0, 10, (64,))
    kernels.cross_entropy(x * 1, target, inplace_backward=True)
    assert launches == [1]
    kernels.cross_entropy(torch.randn(SMALL_CPU_LOGITS // 8, 8), torch.zeros(SMALL_CPU_LOGITS // 8, dtype=torch.long))
    assert launches == [1, 1]
    kernels.set_backend("cpu")
    kernels.cross_entropy(x, target)
    assert launches == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# Errors

@pytest.fixture(params=[*_backends(), Backend("unforced", torch.device("cpu"))], ids=str)
def checked(request) -> Backend:
    """Each backend forced, and the CPU unforced, where a small call goes to F.cross_entropy
    before any check of ours and its refusal is replaced by the error our checks raise."""
    kernels.set_backend(None if request.param.name == "unforced" else request.param.name)
    return request.param


@pytest.mark.parametrize("bad", [10, -1, -101], ids=["C", "negative", "below-ignore"])
def test_target_out_of_range(checked, bad):
    logits = torch.randn(4, 10, dtype=_dtype(checked), device=checked.device, requires_grad=True)
    target = torch.tensor([1, bad, 2, -100], device=checked.device)
    with pytest.raises(ValueError, match=rf"target\[1\] = {bad} is out of range for 10 classes"):
        kernels.cross_entropy(logits, target)
    with pytest.raises(ValueError, match="out of range"):
        kernels.cross_entropy(logits.detach(), target, reduction="none")


def test_bad_arguments(checked):
    dtype = _dtype(checked)
    dev = checked.device
    logits = torch.randn(4, 10, dtype=dtype, device=dev)
    target = torch.randint(0, 10, (4,), device=dev)
    ce = kernels.cross_entropy
    with pytest.raises(TypeError, match="class indices .* or class probabilities"):
        ce(logits, target > 4)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        ce(logits, [1, 2, 3, 4])
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        ce(logits.tolist(), target)
    with pytest.raises(TypeError, match="dtype"):
        ce(logits.to(torch.int32), target)
    with pytest.raises(ValueError, match=r"target of shape \(3,\) does not match logits of shape \(4, 10\)"):
        ce(logits, target[:3])
    with pytest.raises(ValueError, match="does not match"):
        ce(logits, target[:, None])
    with pytest.raises(ValueError, match="does not match"):
        ce(logits[0], target[:1])
    with pytest.raises(ValueError, match=r"target of shape \(4,\) does not match logits of shape \(1, 4, 10\) "
                                         r"\(expected \(1, 10\)\)"):
        ce(logits[None], target)
    with pytest.raises(ValueError, match="1 or more dimensions"):
        ce(logits[0, 0], target[0])
    with pytest.raises(ValueError, match=r"weight must have one entry per class, shape \(10,\), got \(9,\)"):
        ce(logits, target, weight=torch.ones(9, dtype=dtype, device=dev))
    with pytest.raises(TypeError, match="weight has dtype"):
        ce(logits, target, weight=torch.ones(10, dtype=torch.float16, device=dev))
    with pytest.raises(ValueError, match="weight is on meta"):
        ce(logits, target, weight=torch.ones(10, dtype=dtype, device="meta"))
    with pytest.raises(ValueError, match="target is on meta"):
        ce(logits, target.to("meta"))
    with pytest.raises(ValueError, match="reduction must be one of none, sum, mean, got 'avg'"):
        ce(logits, target, reduction="avg")
    for eps in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            ce(logits, target, label_smoothing=eps)
    with pytest.raises(ValueError, match="no classes"):
        ce(logits[:, :0], target)


def test_ignore_index_and_label_smoothing_types(checked):
    """The errors PyTorch's F.cross_entropy gives: TypeError for a float or bool ignore_index or a
    non-number label_smoothing, ValueError for an ignore_index outside int64; a 0-d integer
    tensor is an index, as there."""
    dtype = _dtype(checked)
    logits = torch.randn(4, 10, dtype=dtype, device=checked.device)
    target = torch.tensor([1, 2, 3, 4], device=checked.device)
    for bad, error in ((1.7, TypeError), (True, TypeError), ("3", TypeError), (2**64, ValueError),
                       (2**63, ValueError), (-2**63 - 1, ValueError)):
        with pytest.raises(error):
            F.cross_entropy(logits.cpu(), target.cpu(), ignore_index=bad)
        with pytest.raises(error, match="ignore_index"):
            kernels.cross_entropy(logits, target, ignore_index=bad)
    for bad in ("0.1", None):
        with pytest.raises(TypeError, match="label_smoothing must be float"):
            kernels.cross_entropy(logits, target, label_smoothing=bad)
    want = F.cross_entropy(logits.cpu().double(), target.cpu(), ignore_index=2)
    for index in (2, torch.tensor(2), -2**63 + 2 + 2**63):
        torch.testing.assert_close(kernels.cross_entropy(logits, target, ignore_index=index).cpu().double(), want,
                                   **TOL[dtype])
    kernels.cross_entropy(logits, target, ignore_index=-2**63)


def test_reductions_restated_in_cpp():
    """csrc/cross_entropy.cpp restates the reduction names; they must be the Python ones."""
    from kernels import _C
    from kernels.reference.cross_entropy import REDUCTIONS

    assert tuple(_C.cross_entropy_reductions) == REDUCTIONS == ("none", "sum", "mean")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_on_the_cpu_runs_pytorch(dtype):
    """bf16/fp16 CPU logits, which the C++ kernels do not compute, run the torch backend unless a
    backend is forced: loss and gradient as F.cross_entropy's (in float64) within the dtype's
    rounding."""
    logits, target = _inputs(16, 37, "cpu", dtype, ignore=True)
    assert kernels.backend_for(logits) == "torch"
    _check(logits, target, weight=(torch.rand(37) + 0.5).to(dtype), label_smoothing=0.1)
    _check(logits, target, reduction="none")


def test_cpu_backend_dtypes(monkeypatch):
    kernels.set_backend("cpu")
    with pytest.raises(TypeError, match="float32, float64"):
        kernels.cross_entropy(torch.randn(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# GPU only: half precision, no host synchronisation, the device-side assert

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [1000, 50257])
def test_half_precision_cuda(dtype, C, monkeypatch):
    kernels.set_backend("triton")
    logits, target = _inputs(64, C, "cuda", dtype, ignore=True)
    weight = torch.rand(C, device="cuda").to(dtype) + 0.5
    _check(logits, target, weight=weight, label_smoothing=0.1)
    _check(logits, target, reduction="none", grad_out=torch.randn(64, device="cuda"))


@cuda_only
def test_no_host_sync_cuda(monkeypatch):
    """Forward and backward with every option never synchronise with the host."""
    kernels.set_backend("triton")
    logits, target = _inputs(32, 40000, "cuda", torch.bfloat16, ignore=True)
    weight = torch.rand(40000, device="cuda", dtype=torch.bfloat16)
    x = logits.requires_grad_()
    kernels.cross_entropy(x, target, weight, label_smoothing=0.1).backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in REDUCTIONS:
            loss = kernels.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1)
            loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_bad_target_device_assert_cuda():
    """On CUDA an out-of-range target fails the stream (device-side assert) at the next sync; it
    runs in a child process because that leaves the CUDA context unusable."""
    script = textwrap.dedent("""
        import torch, kernels
        logits = torch.randn(4, 1000, device="cuda", requires_grad=True)
        loss = kernels.cross_entropy(logits, torch.tensor([1, 5000, 2, 3], device="cuda"), reduction="none")
        torch.cuda.synchronize()
    """)
    env = dict(os.environ, KERNELS_BACKEND="triton")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "device-side assert" in out.stderr or "out of range" in out.stderr
