"""Softmax cross-entropy forward+backward: kernels.cross_entropy against F.cross_entropy eager,
torch.compile of it, and Liger-Kernel's cross entropy when it is importable (GPU; no dependency).

Each call is one training step's worth: loss = ce(logits, target); loss.backward(), with the
gradient set to None first (as optimizer.zero_grad() does), mean reduction. Effective bandwidth
counts the logits read once and the gradient written once (2 N C bytes-per-element); the
"copy" row of each run is a device-to-device copy of a large tensor (bytes read + written), the
roofline that every rate is also quoted against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from benchmarks.harness import OURS, Results

GPU_CASES = [(torch.bfloat16, 8192, 32000), (torch.bfloat16, 4096, 128256), (torch.float32, 64, 10)]
CPU_CASES = [(torch.float32, 64, 10), (torch.float32, 1024, 1000), (torch.float32, 4096, 32000)]
QUICK_CASES = {"cuda": [(torch.bfloat16, 4096, 32000), (torch.float32, 64, 10)],
               "cpu": [(torch.float32, 64, 10), (torch.float32, 256, 32000)]}
COPY_BYTES = 1 << 30  # the copy roofline reads and writes 1 GiB (256 MiB on the CPU)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:  # not installed, or it does not import here: it is optional
        return None
    return liger_cross_entropy


def _step(ce, logits, target):
    def step():
        logits.grad = None
        ce(logits, target).backward()

    return step


def _inplace_step(base, target):
    """inplace_backward writes dlogits over the logits: a fresh leaf viewing the same buffer each
    call (its values are yesterday's gradient, which does not change the work)."""
    def step():
        logits = base.detach().requires_grad_()
        kernels.cross_entropy(logits, target, inplace_backward=True).backward()

    return step


def _copy_rate(results: Results, device: torch.device) -> float | None:
    """Times the roofline row (a copy of a large tensor) and returns its bytes per second."""
    copy_bytes = COPY_BYTES if device.type == "cuda" else COPY_BYTES // 4
    src = torch.empty(copy_bytes // 4, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = results.time("device-to-device copy (roofline)", "torch copy_", lambda: dst.copy_(src),
                           work=2 * copy_bytes, unit="GB/s", scale=1e9)
    return 2 * copy_bytes / seconds if seconds else None


def run(device: torch.device, quick: bool = False) -> Results:
    results = Results("cross_entropy", str(device))
    unit = "GB/s"
    copy_rate = _copy_rate(results, device)

    cases = QUICK_CASES[device.type] if quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    liger = _liger() if device.type == "cuda" else None
    for dtype, N, C in cases:
        case = f"{str(dtype).replace('torch.', '')} ({N}, {C})"
        logits = torch.randn(N, C, device=device, dtype=dtype).requires_grad_()
        target = torch.randint(0, C, (N,), device=device)
        work = 2 * N * C * logits.element_size()
        impls = {
            OURS: _step(kernels.cross_entropy, logits, target),
            f"{OURS} (inplace_backward)": _inplace_step(logits.detach().clone(), target),
            "torch eager": _step(F.cross_entropy, logits, target),
            "torch.compile": _step(torch.compile(F.cross_entropy), logits, target),
        }
        if liger is not None:
            impls["Liger-Kernel"] = _step(liger, logits, target)
        results.compare(case, impls, work=work, unit=unit, scale=1e9)
        for row in results.rows[-len(impls):]:
            if row.seconds and copy_rate:
                row.unit = f"GB/s ({work / row.seconds / copy_rate:.0%} of copy)"
        del logits, impls
        torch.compiler.reset()  # one compiled graph per case: 8 shapes on one function hit dynamo's recompile limit
    return results
