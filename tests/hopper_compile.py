"""Compiles every Triton kernel of the library for Hopper (sm_90) without a GPU, and reports, one
JSON line per kernel variant, what the compiler made of it: shared memory, register spills (from
ptxas -v), and whether the matrix kernels use wgmma and the TMA ones bulk tensor copies.

Triton's wheel bundles ptxas, so this runs on any machine: tests/test_hopper_compile.py runs it
in CI, and ``PYTHONPATH=<another triton's site-packages> python tests/hopper_compile.py`` checks
another Triton version (the device machine has 3.6). It must run without TRITON_INTERPRET.
The variants are the launch configurations the launchers use on an H100/H200: every autotuner
config of the matrix kernels, and the block/warp choices of the others.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton import adam, cross_entropy, linear  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
SM_COUNT = 132  # H100 SXM; the H200 has the same


def spilled_bytes(ptx: str) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([PTXAS, f"-arch=sm_{TARGET.arch}a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill", report))


def compile_variant(name: str, fn, signature: dict, constants: dict, num_warps: int, num_stages: int = 3) -> dict:
    signature = dict(signature, **{k: "constexpr" for k in constants})
    compiled = triton.compile(ASTSource(fn, signature, constants), target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return {"kernel": name, "shared": compiled.metadata.shared, "spills": spilled_bytes(ptx),
            "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
            "variant": {k: str(v) for k, v in constants.items()}, "num_warps": num_warps, "num_stages": num_stages}


def linear_variants():
    """The generic GEMM's forward in every autotuner config in bf16 and fp32, its small-problem
    config in fp32 for the forward and for the dW GEMM with its prologue and row sums; the TMA
    GEMM's three uses in every config of theirs."""
    pointers = ["a_ptr", "y_ptr", "b_ptr", "c_ptr", "bias_ptr", "row_sum_ptr"]
    sizes = ["M", "N", "K", "stride_am", "stride_ak", "stride_ym", "stride_yk", "stride_bk", "stride_bn",
             "stride_cm", "stride_cn"]

    def generic(dtype, flags, config):
        signature = {**{p: f"*{dtype}" for p in pointers}, **{s: "i32" for s in sizes}}
        constants = dict(ACTIVATION="none", GRAD_OF="none", HAS_BIAS=False, ROW_SUM=False, STORE_C=True,
                         DOT_PRECISION="ieee", ACC_DTYPE=tl.float32, **config.kwargs)
        constants.update(flags)
        return (f"linear generic {dtype}", linear._fused_matmul_kernel, signature, constants, config.num_warps,
                config.num_stages)

    forward = dict(ACTIVATION="relu", HAS_BIAS=True)
    for dtype in ("bf16", "fp32"):
        for config in linear._CONFIGS:
            yield generic(dtype, forward, config)
    small = dict(linear._SMALL_CONFIG)
    small_config = triton.Config({k: small.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, **small)
    yield generic("fp32", forward, small_config)
    yield generic("fp32", dict(GRAD_OF="relu", ROW_SUM=True), small_config)

    uses = {"forward": dict(B_TRANSPOSED=True, ACTIVATION="relu", HAS_BIAS=True),
            "grad_input": dict(GRAD_OF="relu"),
            "grad_weight": dict(A_TRANSPOSED=True, GRAD_OF="relu", ROW_SUM=True)}
    for use, flags in uses.items():
        for config in linear._TMA_CONFIGS["GRAD_OF" in flags]:
            constants = dict(A_TRANSPOSED=False, B_TRANSPOSED=False, ACTIVATION="none", GRAD_OF="none",
                             HAS_BIAS=False, ROW_SUM=False, NUM_PROGRAMS=SM_COUNT, **config.kwargs)
            constants.update(flags)
            blocks = linear._tma_blocks(constants)
            signature = {name: f"tensordesc<bf16[{', '.join(map(str, blocks[name]))}]>"
                         for name in ("a_desc", "y_desc", "b_desc", "c_desc")}
            signature.update(bias_ptr="*bf16", row_sum_ptr="*bf16", M="i32", N="i32", K="i32")
            yield (f"linear TMA {use}", linear._fused_matmul_tma_kernel, signature, constants, config.num_warps,
                   config.num_stages)


def cross_entropy_variants():
    """bf16 logits: the vocabulary-sized rows (streamed) and MNIST's 10 classes (one block), with
    weights and label smoothing; the statistics and grad-scaling kernels."""
    stats = {"target_ptr": "*i64", "weight_ptr": "*bf16", "stats_ptr": "*fp32", "ok_ptr": "*i32", "N": "i32",
             "C": "i32", "ignore_index": "i64"}
    yield ("cross_entropy target stats", cross_entropy._target_stats_kernel, stats,
           dict(HAS_WEIGHT=True, SUM_WEIGHT=True, COMPUTE=tl.float32, BLOCK=cross_entropy.STATS_BLOCK), 8, 3)
    rows = {"logits_ptr": "*bf16", "target_ptr": "*i64", "weight_ptr": "*bf16", "stats_ptr": "*fp32",
            "loss_ptr": "*fp32", "grad_ptr": "*bf16", "C": "i32", "ignore_index": "i64"}
    for C in (32000, 128256, 10):
        block, num_warps, single = cross_entropy._row_config(C)
        for smoothing, weighted in ((0.0, False), (0.1, True)):
            yield (f"cross_entropy rows C={C}", cross_entropy._cross_entropy_kernel, rows,
                   dict(LABEL_SMOOTHING=smoothing, HAS_WEIGHT=weighted, MEAN=True, COMPUTE_GRAD=True,
                        COMPUTE=tl.float32, BLOCK=block, SINGLE_BLOCK=single), num_warps, 3)
    scale = {"grad_ptr": "*bf16", "grad_output_ptr": "*bf16", "grad_output_stride": "i32", "C": "i32"}
    yield ("cross_entropy scale grad", cross_entropy._scale_grad_kernel, scale,
           dict(COMPUTE=tl.float32, BLOCK=cross_entropy.SCALE_BLOCK), 8, 3)


def adam_variants():
    """float32 and bfloat16 parameters, plain and with every option, lr on the host and on the device."""
    scalars = {"chunk_size": "i32", **{f"{s}_bits": "i64" for s in ("lr", "beta1", "beta2", "eps", "weight_decay")}}
    for param, options, lr_on_device in ((tl.float32, False, False), (tl.float32, True, True),
                                         (tl.bfloat16, True, False)):
        signature = {"tensors": "*i64", "chunks": "*i64", "tickets": "*i32", "lr_ptr": "*fp32", **scalars}
        constants = dict(PARAM_DTYPE=param, COMPUTE=tl.float32, LR_ON_DEVICE=lr_on_device, HAS_WEIGHT_DECAY=options,
                         DECOUPLED=options, AMSGRAD=options, MAXIMIZE=options, ALIGNED=True, BLOCK=adam.BLOCK)
        if not lr_on_device:
            signature.pop("lr_ptr")
            constants["lr_ptr"] = None
        yield ("adam", adam.adam_kernel, signature, constants, adam.NUM_WARPS, 3)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_compile.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    for variants in (linear_variants(), cross_entropy_variants(), adam_variants()):
        for name, fn, signature, constants, num_warps, num_stages in variants:
            print(json.dumps(compile_variant(name, fn, signature, constants, num_warps, num_stages)), flush=True)


if __name__ == "__main__":
    main()
