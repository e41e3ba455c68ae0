"""Every Triton kernel compiles for Hopper (sm_90) with the installed Triton, checked without a
GPU by tests/hopper_compile.py (in a child process: the other tests run Triton interpreted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.triton.linear import HOPPER_SHARED_MEMORY

# On a GPU the CUDA tests compile and run every kernel themselves; this check is for machines
# without one (and its minutes of compiling are better spent there on the device's tests).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the CUDA tests compile the kernels")

SCRIPT = Path(__file__).with_name("hopper_compile.py")
# Register spills allowed, in bytes. The GEMMs in bf16 (with and without the activation-gradient
# prologue), Adam and SGD spill nothing; with Triton 3.6 the fp32 small-problem tile of the GEMM
# and the weighted, smoothed rows of cross_entropy keep one 8-byte slot on the stack (3.8: none).
# The generic GEMM's other fp32 tiles are not checked (its FMA path holds fp32 operand tiles in
# registers, and a few spill some bytes): fp32 takes them only past the MNIST sizes.
SPILL_LIMITS = {"linear TMA": 0, "linear generic bfloat16": 0, "linear small": 8, "adam": 0, "sgd": 0,
                "cross_entropy": 8}
GEMM_USES = ("forward", "grad_input", "grad_weight")


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_every_kernel_fits_and_does_not_spill(reports):
    kinds = {r["kernel"].split(" C=")[0] for r in reports}
    gemms = {f"linear {form} {use}" for form in ("generic bfloat16", "generic float32", "TMA bfloat16")
             for use in GEMM_USES}
    assert gemms | {"linear small float32 forward", "linear small float32 grad_weight", "cross_entropy_kernel",
                    "small_cross_entropy_kernel", "adam", "sgd"} <= {k.replace("cross_entropy ", "") for k in kinds}
    for r in reports:
        assert r["shared"] <= HOPPER_SHARED_MEMORY, r
        limit = next((v for k, v in SPILL_LIMITS.items() if r["kernel"].startswith(k)), None)
        assert limit is None or r["spills"] <= limit, r


def test_no_32_bit_offsets_grow_with_the_tensors(reports):
    """No variant, compiled for an output head past 2^31 elements, multiplies an index by a
    run-time stride or size in 32 bits on the way to a pointer (it would wrap past 2^31)."""
    for r in reports:
        assert r["narrow_offsets"] == [], r


def test_gemm_shared_memory_estimate_is_an_upper_bound(reports):
    """The launcher keeps a tile off a chip by its estimate of the tile's shared memory: it must
    not be less than what the compiler allocates (else a tile that does not fit would be tried)."""
    gemms = [r for r in reports if r["kernel"].startswith("linear")]
    assert gemms
    for r in gemms:
        assert r["shared_estimate"] >= r["shared"], r


def test_memory_bound_kernels_load_16_bytes_per_thread(reports):
    """Cross-entropy over vocabulary-sized rows, Adam and SGD stream memory: their loads must be
    vector loads (the rows of 10 classes are too short, and unaligned, to have any)."""
    for r in reports:
        if r["kernel"] in ("cross_entropy cross_entropy_kernel C=32000", "cross_entropy cross_entropy_kernel C=128256",
                           "adam", "sgd"):
            assert r["vector_loads"] > 0, r


def test_matrix_kernels_use_hopper_instructions(reports):
    """The TMA GEMM moves its tiles with bulk tensor copies and multiplies with wgmma; so does
    every bf16 config of the generic GEMM that has a warpgroup (4 warps) and 64 rows for it."""
    for r in reports:
        if r["kernel"].startswith("linear TMA"):
            assert r["tma"] and r["wgmma"], r
        elif (r["kernel"].startswith("linear generic bfloat16") and int(r["variant"]["BLOCK_M"]) >= 64
              and r["num_warps"] >= 4):
            assert r["wgmma"], r
