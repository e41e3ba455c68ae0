"""Optimizer step time: kernels.FusedAdam against torch.optim.Adam (foreach=True, fused=True), and
kernels.FusedSGD against torch.optim.SGD (foreach=True, fused=True), both with momentum 0.9.

Cases: the MNIST MLP's parameters (784-128-64-10: 109,386 in 6 tensors), 10M in one tensor
(CPU), 100M in 100 tensors (Adam; skipped with --quick), and 1B in 64 tensors (Adam; GPU only,
not with --quick). Effective bandwidth counts the bytes a step must move per float32 parameter:
Adam 28 (param, grad, exp_avg and exp_avg_sq read, param, exp_avg and exp_avg_sq written), SGD
with momentum 20 (param, grad and buffer read, param and buffer written).
"""
from __future__ import annotations

import torch

from benchmarks.harness import OURS, Results
from kernels import FusedAdam, FusedSGD
from kernels.ops.param_table import FusedOptimizer

MNIST_SHAPES = [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]
MNIST = "MNIST MLP: 109,386 params in 6 tensors"
BYTES_PER_PARAM = {"Adam": 28, "SGD": 20}

IMPLS = {
    "Adam": {
        OURS: lambda params: FusedAdam(params, lr=1e-3),
        "torch foreach": lambda params: torch.optim.Adam(params, lr=1e-3, foreach=True),
        "torch fused": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
    },
    "SGD": {
        OURS: lambda params: FusedSGD(params, lr=1e-2, momentum=0.9),
        "torch foreach": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True),
        "torch fused": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=True),
    },
}


def cases(device: torch.device, quick: bool) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(optimizer, case name, parameter shapes)."""
    out = []
    for optimizer in IMPLS:
        out.append((optimizer, MNIST, MNIST_SHAPES))
        if device.type == "cpu":
            out.append((optimizer, "10M params in 1 tensor", [(10_000_000,)]))
    if not quick:
        out.append(("Adam", "100M params in 100 tensors", [(1_000_000,)] * 100))
        if device.type == "cuda":
            out.append(("Adam", "1B params in 64 tensors", [(15_625_000,)] * 64))
    return out


def graphed_step(opt: torch.optim.Optimizer):
    """A function replaying opt.step from a CUDA graph, captured at its first call (after a
    warm-up step on a side stream), so that a capture failure is reported like any other."""
    replay = None

    def step():
        nonlocal replay
        if replay is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            replay = graph.replay
        replay()

    return step


def overheads(make, params: list[torch.Tensor]) -> dict:
    """What the Python around the kernel costs, as two more rows of an MNIST case (``make`` builds
    our optimizer over ``params``): the step without torch.optim's step-hook wrapper (which every
    Optimizer subclass gets, and which ours does not bypass), and the step of a loop that hands it
    new gradient tensors every step (zero_grad(set_to_none=True)), whose table rows are then made
    again."""
    opt = make(params)
    grad_sets = [[p.grad.clone() for p in params] for _ in range(2)]
    calls = iter(range(1 << 62))

    def step_with_new_gradients():
        for p, g in zip(params, grad_sets[next(calls) % 2]):
            p.grad = g
        opt.step()

    return {f"{OURS}, without torch.optim's hook wrapper": lambda: FusedOptimizer.step(opt),
            f"{OURS}, new gradient tensors every step": step_with_new_gradients}


def run(device: torch.device, quick: bool = False) -> Results:
    results = Results("adam", str(device))
    results.meta["bytes_per_param"] = BYTES_PER_PARAM
    for optimizer, case, shapes in cases(device, quick):
        params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        work = BYTES_PER_PARAM[optimizer] * sum(p.numel() for p in params)
        name = f"{optimizer}, {case}"
        impls = {impl: make(params).step for impl, make in IMPLS[optimizer].items()}
        if shapes is MNIST_SHAPES:
            impls.update(overheads(IMPLS[optimizer][OURS], params))
        if device.type == "cuda" and shapes is MNIST_SHAPES:
            opt = IMPLS[optimizer][OURS](params)
            opt.param_groups[0]["capturable"] = True
            impls[f"{OURS}, CUDA graph replay"] = graphed_step(opt)
        results.compare(name, impls, work=work, unit="GB/s", scale=1e9)
        del impls  # and with them the optimizers' states
        del params
    return results
