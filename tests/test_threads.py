"""Which threads run the C++ kernels: PyTorch's OpenMP team for the kernels called from Python,
the extension's own pool where there is no such team (and inside MLPStep), and a new pool in a
forked child, where the parent's OpenMP team does not exist (csrc/common.h: HostTeam)."""
import contextlib
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTORCH_USES_OPENMP = "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")


@pytest.fixture(params=[True, False], ids=["pytorch_team", "own_pool"])
def team(request):
    _C.set_openmp_team(request.param)
    with kernels.use_backend("cpu"):
        yield request.param
    _C.set_openmp_team(True)


@pytest.mark.skipif(not PYTORCH_USES_OPENMP, reason="this PyTorch runs its CPU ops without OpenMP")
def test_the_team_is_the_openmp_runtime_pytorch_loaded():
    path = _C.openmp_team()
    assert os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")), path
    with open("/proc/self/maps") as maps:
        assert path in maps.read()  # already loaded (by torch), not loaded by us


def test_both_teams_compute_what_pytorch_computes(team):
    """Sizes that take both threads in every kernel, on either team."""
    torch.manual_seed(0)
    with _threads(2):
        x = torch.randn(256, 512, requires_grad=True)
        layer = torch.nn.Linear(512, 384)
        w, b = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
        y = kernels.linear(x, w, b, "relu")
        dy = torch.randn_like(y)
        y.backward(dy)
        x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y_ref = F.relu(F.linear(x_ref, w_ref, b_ref))
        y_ref.backward(dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        for got, want in ((x.grad, x_ref.grad), (w.grad, w_ref.grad), (b.grad, b_ref.grad)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)

        logits = torch.randn(512, 1000, requires_grad=True)
        target = torch.randint(0, 1000, (512,))
        kernels.cross_entropy(logits, target).backward()
        ref = logits.detach().clone().requires_grad_()
        F.cross_entropy(ref, target).backward()
        torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-7)

        params = [torch.randn(300, 400, requires_grad=True), torch.randn(400, requires_grad=True)]
        twins = [p.detach().clone().requires_grad_() for p in params]
        ours, theirs = kernels.FusedAdam(params, lr=1e-2), torch.optim.Adam(twins, lr=1e-2)
        for _ in range(3):
            for p, q in zip(params, twins):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            ours.step()
            theirs.step()
        for p, q in zip(params, twins):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_forked_child_runs_the_kernels_on_a_new_pool():
    """After fork the parent's OpenMP team does not exist in the child (PyTorch's own parallel ops
    hang there); the kernels leave it alone and run on a pool of the child's own."""
    script = textwrap.dedent("""
        import os, torch, kernels
        from kernels import _C
        torch.set_num_threads(2)
        x, w, b = torch.randn(512, 1024), torch.randn(1024, 1024), torch.randn(1024)
        y = kernels.linear(x, w, b)
        torch.relu(x @ w.t())  # PyTorch's team has run in the parent
        pid = os.fork()
        if pid == 0:
            again = kernels.linear(x, w, b)  # both threads: 512 x 1024 x 1024
            same = again.numpy().tobytes() == y.numpy().tobytes()  # numpy: PyTorch's ops would hang here
            os._exit(0 if same and _C.openmp_team() == "" else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child exit 0"


@contextlib.contextmanager
def _threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_python_threads_calling_at_once_each_get_their_answer(team):
    """Several Python threads in the kernels at once (the GIL is released inside them): on
    PyTorch's team each caller leads a team of its own; on the pool, a call that finds it busy
    runs on its own thread. Either way every caller gets its own, correct result."""
    torch.manual_seed(0)
    inputs = [(torch.randn(256, 512), torch.randn(384, 512), torch.randn(384)) for _ in range(4)]
    expected = [F.relu(F.linear(x, w, b)) for x, w, b in inputs]
    results, errors = [None] * len(inputs), []

    def work(i):
        try:
            for _ in range(20):
                results[i] = kernels.linear(*inputs[i], "relu")
        except Exception as e:  # reported below: a thread's exception would otherwise be lost
            errors.append(e)

    with _threads(2):
        workers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in workers)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
