"""Where one CPU training step of the MNIST MLP (784-128-64-10, batch 64, Adam) spends its time:
``python -m benchmarks.profile_step [--threads N] [--isa avx2]``.

Prints, per step: the C++ kernels alone (called directly on kept buffers: the arithmetic), the
optimizer step, the whole step through autograd (kernels.linear / cross_entropy and
loss.backward(), what any model gets), the whole step through kernels.MLPStep with the
optimizer inside (one native call a step, and STEPS_PER_CALL steps a call as ffnn runs it), and
PyTorch eager's step. The difference between a whole step and its kernels is the
Python, autograd and allocation around them. Times are the minimum over repeats of the mean per
step; with one thread they are the calling thread's CPU time (time.thread_time), which other
processes on a shared machine barely move; with more threads, wall time. ``--isa avx2`` runs
it as an AVX2-only CPU would, ours and PyTorch alike (see ``benchmarks.run``).
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch

import kernels
from benchmarks import harness
from ffnn.model import build, loss_function
from ffnn.step import STEPS_PER_CALL, World, calls, make_optimizer, make_step

SIZES, BATCH, ROWS = (784, 128, 64, 10), 64, 6400


def per_call(fn, clock, calls: int = 300, repeats: int = 7) -> float:
    """Minimum over repeats of the mean seconds per call of fn."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - t0) / calls)
    return best


def kernels_alone(clock) -> dict[str, float]:
    """Each C++ kernel of the step on kept buffers, without Python around it but the pybind11 call."""
    from kernels import _C

    threads = torch.get_num_threads()
    times = {}
    acts = ["relu"] * (len(SIZES) - 2) + ["none"]
    for i, (K, N) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        x, w, b = torch.randn(BATCH, K), torch.randn(N, K) * 0.05, torch.randn(N)
        y, dy, dx, dw, db = torch.empty(BATCH, N), torch.randn(BATCH, N), torch.empty(BATCH, K), torch.empty(N, K), torch.empty(N)
        a = acts[i]
        times[f"linear fwd {BATCH}x{K}x{N}"] = per_call(lambda: _C.linear_forward(
            "float32", x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), BATCH, N, K, a, threads), clock)
        times[f"linear bwd {BATCH}x{K}x{N}" + (" (no dx)" if i == 0 else "")] = per_call(lambda: _C.linear_backward(
            "float32", dy.data_ptr(), 0 if a == "none" else y.data_ptr(), x.data_ptr(), w.data_ptr(),
            0 if i == 0 else dx.data_ptr(), dw.data_ptr(), db.data_ptr(), BATCH, N, K, a, threads), clock)
    logits, target, grad, loss = torch.randn(BATCH, SIZES[-1]), torch.randint(0, SIZES[-1], (BATCH,)), \
        torch.empty(BATCH, SIZES[-1]), torch.empty(())
    times["cross-entropy fwd+grad"] = per_call(lambda: _C.cross_entropy_forward(
        "float32", logits.data_ptr(), target.data_ptr(), 0, loss.data_ptr(), grad.data_ptr(), BATCH, SIZES[-1], -100,
        0.0, "mean", threads), clock)
    return times


def steps(clock) -> dict[str, float]:
    x_all, y_all = torch.randn(ROWS, SIZES[0]), torch.randint(0, SIZES[-1], (ROWS,))
    index = [torch.randint(0, ROWS, (BATCH,)) for _ in range(64)]
    times = {}
    for name, impl, native in (("step, autograd path (ours)", "fused", False),
                               ("step, MLPStep with FusedAdam inside (ours)", "fused", True),
                               ("step, PyTorch eager + fused Adam", "torch", False)):
        model = build(impl, SIZES, seed=0)
        optimizer = make_optimizer(SimpleNamespace(lr=1e-3, weight_decay=None, impl=impl, optimizer="adam"),
                                   model.parameters(), capturable=False)
        loss_fn = loss_function(impl)
        if impl == "fused" and not native:
            loss_fn = lambda logits, target: kernels.cross_entropy(logits, target)  # noqa: E731 (not MLPStep's)
        step = make_step(model, optimizer, loss_fn, x_all, y_all, torch.zeros(()), World(), 1.0)
        it = iter(range(10**9))
        times[name] = per_call(lambda: step(index[next(it) % len(index)]), clock)
        if impl == "fused" and native:
            chunks = [c for c in calls(index, STEPS_PER_CALL) if len(c) == STEPS_PER_CALL]  # as ffnn groups them
            times[f"step, MLPStep, {STEPS_PER_CALL} steps a call (what ffnn runs)"] = per_call(
                lambda: step(chunks[next(it) % len(chunks)]), clock, calls=300 // STEPS_PER_CALL) / STEPS_PER_CALL
            times["optimizer step alone (FusedAdam.step())"] = per_call(optimizer.step, clock)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    harness.add_isa_option(p)
    args = p.parse_args(argv)
    if args.isa and (status := harness.run_as_isa(p, args.isa, "benchmarks.profile_step", argv)) is not None:
        return status
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    from kernels import _C

    print(f"threads {args.threads}, SIMD {_C.isa()}, clock {clock.__name__}")
    rows = {**kernels_alone(clock), **steps(clock)}
    print("| part of a step | us |\n|---|---:|")
    kernel_total = sum(v for k, v in rows.items() if k.startswith(("linear", "cross")))
    for k, v in rows.items():
        print(f"| {k} | {v * 1e6:.1f} |")
    print(f"| kernels alone, total (no optimizer) | {kernel_total * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
