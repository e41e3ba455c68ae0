"""Linear + bias + ReLU: kernels.linear against PyTorch, forward and forward+backward.

Peers, on the same inputs in the same run: ``F.relu(F.linear(x, w, b))`` eager, the same under
``torch.compile``, and on the GPU ``torch._addmm_activation`` (cuBLASLt's fused bias+ReLU
epilogue). Work is 2MNK flops for the forward and 6MNK for forward+backward (dx, dW and db all
computed; gradients are reset to None between calls, as ``zero_grad`` does).

GPU cases: bf16 4096^3 and 8192^3 (the latter not with --quick) forward, bf16 4096^3
forward+backward, and the MNIST MLP's layers in fp32 (batch 64: 784->128, 128->64, 64->10).
CPU cases: the MNIST layers and 512x1024x1024, forward and forward+backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import OURS, Results
import kernels

MNIST_LAYERS = [(64, 784, 128), (64, 128, 64), (64, 64, 10)]


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
    shapes = MNIST_LAYERS + ([] if quick else [(512, 1024, 1024)])
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
    on_gpu = device.type == "cuda"
    unit, scale = ("TFLOP/s", 1e12) if on_gpu else ("GFLOP/s", 1e9)
    for (M, K, N), dtype, backward in cases(device, quick):
        layer = torch.nn.Linear(K, N, device=device, dtype=dtype)
        x = torch.randn(M, K, device=device, dtype=dtype).requires_grad_(backward)
        w = layer.weight.detach().requires_grad_(backward)
        b = layer.bias.detach().requires_grad_(backward)
        dtype_name = str(dtype).replace("torch.", "")
        case = f"{'fwd+bwd' if backward else 'fwd'} {dtype_name} {M}x{K}x{N}"
        work = (6 if backward else 2) * M * N * K
        for impl, fn in peers(device, backward).items():
            results.time(case, impl, timed(fn, x, w, b, backward), work=work, unit=unit, scale=scale)
        del x, w, b, layer
        if on_gpu:
            torch.cuda.empty_cache()
    return results
