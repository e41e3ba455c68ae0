"""Adam step time: kernels.FusedAdam against torch.optim.Adam with foreach=True and fused=True.

Cases: the MNIST MLP's parameters (784-128-64-10: 109,386 in 6 tensors), 10M in one tensor
(CPU), 100M in 100 tensors (skipped with --quick), and 1B in 64 tensors (GPU only, not with
--quick). Effective bandwidth counts 28 bytes per float32 parameter: param, grad, exp_avg and
exp_avg_sq read (16), param, exp_avg and exp_avg_sq written (12).
"""
from __future__ import annotations

import torch

from benchmarks.harness import OURS, Results
from kernels import FusedAdam

MNIST_SHAPES = [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]
BYTES_PER_PARAM = 28

IMPLS = {
    OURS: lambda params: FusedAdam(params, lr=1e-3),
    "torch foreach": lambda params: torch.optim.Adam(params, lr=1e-3, foreach=True),
    "torch fused": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
}


def cases(device: torch.device, quick: bool) -> list[tuple[str, list[tuple[int, ...]]]]:
    out = [("MNIST MLP: 109,386 params in 6 tensors", MNIST_SHAPES)]
    if device.type == "cpu":
        out.append(("10M params in 1 tensor", [(10_000_000,)]))
    if not quick:
        out.append(("100M params in 100 tensors", [(1_000_000,)] * 100))
        if device.type == "cuda":
            out.append(("1B params in 64 tensors", [(15_625_000,)] * 64))
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


def run(device: torch.device, quick: bool = False) -> Results:
    results = Results("adam", str(device))
    results.meta["bytes_per_param"] = BYTES_PER_PARAM
    for case, shapes in cases(device, quick):
        params = [torch.randn(s, device=device).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        work = BYTES_PER_PARAM * sum(p.numel() for p in params)
        for impl, make in IMPLS.items():
            opt = make(params)
            results.time(case, impl, opt.step, work=work, unit="GB/s", scale=1e9)
            del opt  # free its states before the next impl allocates its own
        if device.type == "cuda" and shapes is MNIST_SHAPES:
            opt = FusedAdam(params, lr=1e-3, capturable=True)
            results.time(case, f"{OURS}, CUDA graph replay", graphed_step(opt), work=work, unit="GB/s", scale=1e9)
            del opt
        del params
    return results
