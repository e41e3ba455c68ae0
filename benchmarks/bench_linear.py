"""Linear + bias + ReLU: kernels.linear against PyTorch, forward and forward+backward.

Peers, on the same inputs in the same run: ``F.relu(F.linear(x, w, b))`` eager, the same under
``torch.compile``, and on the GPU ``torch._addmm_activation`` (cuBLASLt's fused bias+ReLU
epilogue). Work is 2MNK flops for the forward and 6MNK for forward+backward (dx, dW and db all
computed; gradients are reset to None between calls, as ``zero_grad`` does).

GPU cases: bf16 4096^3 and 8192^3 (the latter not with --quick) forward, bf16 4096^3
forward+backward, and the MNIST MLP's layers in fp32 (batch 64: 784->128, 128->64, 64->10).
CPU cases: the MNIST layers, the wider tutorial network's (784->512, 512->128) and 512x1024x1024,
forward and forward+backward; then the MLP layers again against eager PyTorch with one thread.
``python -m benchmarks.run --isa avx2`` runs all of it as an AVX2-only CPU would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import OURS, Results, setting
import kernels

MNIST_LAYERS = [(64, 784, 128), (64, 128, 64), (64, 64, 10)]
WIDE_LAYERS = [(64, 784, 512), (64, 512, 128)]  # the 784-512-128-10 tutorial network


def torch_eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def cases(device: torch.device, quick: bool) -> list[tuple[tuple[int, int, int], torch.dtype, bool]]:
    """(M, K, N), dtype, with backward."""
    if device.type == "cuda":
        big = [((4096, 4096, 4096), torch.bfloat16, False)]
        if not quick:
            big.append(((8192, 8192, 8192), torch.bfloat16, False))
        big.append(((4096, 4096, 4096), torch.bfloat16, True))
        return big + [(s, torch.float32, bwd) for bwd in (False, True) for s in MNIST_LAYERS]
    shapes = MNIST_LAYERS + WIDE_LAYERS + ([] if quick else [(512, 1024, 1024)])
    return [(s, torch.float32, bwd) for bwd in (False, True) for s in shapes]


def peers(device: torch.device, backward: bool) -> dict:
    impls = {OURS: lambda x, w, b: kernels.linear(x, w, b, "relu"), "torch eager": torch_eager,
             "torch.compile": torch.compile(torch_eager, dynamic=False)}
    if device.type == "cuda":
        # cuBLASLt epilogue: relu(b + x @ w^T) in one GEMM.
        impls["cuBLASLt epilogue"] = lambda x, w, b: torch._addmm_activation(b, x, w.t())
    return impls


def timed(fn, x, w, b, backward: bool):
    if not backward:
        return lambda: fn(x, w, b)
    leaves = (x, w, b)
    dy = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

    def step():
        for t in leaves:
            t.grad = None
        fn(x, w, b).backward(dy)

    return step


def run(device: torch.device, quick: bool = False) -> Results:
    results = Results("linear", str(device))
    for (M, K, N), dtype, backward in cases(device, quick):
        time_case(results, device, M, K, N, dtype, backward, peers(device, backward))
    if device.type == "cpu":
        eager = {OURS: lambda x, w, b: kernels.linear(x, w, b, "relu"), "torch eager": torch_eager}
        with setting(torch.get_num_threads, torch.set_num_threads, 1):
            for backward in (False, True):
                for M, K, N in MNIST_LAYERS + WIDE_LAYERS:
                    time_case(results, device, M, K, N, torch.float32, backward, eager, ", 1 thread")
    return results


def time_case(results: Results, device: torch.device, M: int, K: int, N: int, dtype: torch.dtype, backward: bool,
              impls: dict, suffix: str = "") -> None:
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    layer = torch.nn.Linear(K, N, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype).requires_grad_(backward)
    w = layer.weight.detach().requires_grad_(backward)
    b = layer.bias.detach().requires_grad_(backward)
    dtype_name = str(dtype).replace("torch.", "")
    case = f"{'fwd+bwd' if backward else 'fwd'} {dtype_name} {M}x{K}x{N}{suffix}"
    work = (6 if backward else 2) * M * N * K
    results.compare(case, {impl: timed(fn, x, w, b, backward) for impl, fn in impls.items()}, work=work, unit=unit,
                    scale=scale)
    del x, w, b, layer
    torch.compiler.reset()  # one compiled graph per case: past 8 shapes dynamo would run torch_eager uncompiled
    if device.type == "cuda":
        torch.cuda.empty_cache()
