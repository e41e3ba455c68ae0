"""Every Triton kernel compiles for Hopper (sm_90) with the installed Triton, checked without a
GPU by tests/hopper_compile.py (in a child process: the other tests run Triton interpreted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# On a GPU the CUDA tests compile and run every kernel themselves; this check is for machines
# without one (and its minute of compiling is better spent there on the device's tests).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the CUDA tests compile the kernels")

SCRIPT = Path(__file__).with_name("hopper_compile.py")
SHARED_MEMORY = 227 * 1024  # what one block may take on sm_90
# Register spills allowed, in bytes. The GEMMs in bf16 and Adam spill nothing; with Triton 3.6 the
# weighted, smoothed rows of cross_entropy keep one 8-byte slot on the stack. A few of the generic
# GEMM's fp32 tiles spill (its FMA path holds fp32 operand tiles in registers) and are not
# checked: fp32 takes them only past the MNIST sizes, which run on the small-problem tile.
SPILL_LIMITS = {"linear TMA": 0, "linear generic bfloat16": 0, "adam": 0, "sgd": 0, "cross_entropy": 8}


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_kernel_fits_and_does_not_spill(reports):
    kinds = {r["kernel"].split(" C=")[0] for r in reports}
    assert {"linear generic bfloat16", "linear TMA forward", "linear TMA grad_input", "linear TMA grad_weight",
            "cross_entropy rows", "adam", "sgd"} <= kinds
    for r in reports:
        assert r["shared"] <= SHARED_MEMORY, r
        limit = next((v for k, v in SPILL_LIMITS.items() if r["kernel"].startswith(k)), None)
        assert limit is None or r["spills"] <= limit, r


def test_memory_bound_kernels_load_16_bytes_per_thread(reports):
    """Cross-entropy over vocabulary-sized rows and Adam stream memory: their loads must be vector
    loads (the rows of 10 classes are too short, and unaligned, to have any)."""
    for r in reports:
        if r["kernel"] in ("cross_entropy rows C=32000", "cross_entropy rows C=128256", "adam", "sgd"):
            assert r["vector_loads"] > 0, r


def test_matrix_kernels_use_hopper_instructions(reports):
    """The TMA GEMM moves its tiles with bulk tensor copies and multiplies with wgmma; so does
    every config of the generic GEMM that has a warpgroup (4 warps) and 64 rows for it."""
    for r in reports:
        if r["kernel"].startswith("linear TMA"):
            assert r["tma"] and r["wgmma"], r
        elif r["kernel"] == "linear generic bfloat16" and int(r["variant"]["BLOCK_M"]) >= 64 and r["num_warps"] >= 4:
            assert r["wgmma"], r
