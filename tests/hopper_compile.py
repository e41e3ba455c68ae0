"""Compiles every Triton kernel of the library for Hopper (sm_90) without a GPU, and reports, one
JSON line per kernel variant, what the compiler made of it: shared memory, register spills (from
ptxas -v), vector loads, and whether the matrix kernels use wgmma and the TMA ones bulk tensor
copies. Each variant is specialised as Triton's launcher would specialise a real launch on
representative inputs (a 4096^3 bf16 layer, the MNIST layers, vocabulary-sized rows, ...).

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

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

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


def specialize(fn, args: dict, constants: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch of ``fn`` with these argument values, as
    Triton's launcher derives them: ints equal to 1 become constants, 16-aligned pointers and
    ints divisible by 16 carry that divisibility, None is a constant, do_not_specialize args
    keep their type only."""
    signature, constexprs, attrs = {}, dict(constants), {}
    unspecialized = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        kind, spec = native_specialize_impl(BaseBackend, args[name], False, name not in unspecialized, True)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        else:
            signature[name] = kind
            if spec:
                attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def compile_variant(name: str, fn, args: dict, constants: dict, num_warps: int, num_stages: int = 3) -> dict:
    signature, constexprs, attrs = specialize(fn, args, constants)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return {"kernel": name, "shared": compiled.metadata.shared, "spills": spilled_bytes(ptx),
            "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
            "vector_loads": len(re.findall(r"ld\.global\S*\.v[24]\.", ptx)),
            "variant": {k: str(v) for k, v in constants.items()}, "num_warps": num_warps, "num_stages": num_stages}


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype)


def linear_variants():
    """The generic GEMM's forward in every autotuner config on a 4096^3 layer in bf16 and fp32,
    its small-problem tile on MNIST's first layer in fp32 (forward, and dW with its prologue and
    row sums); the TMA GEMM's three uses of a 4096^3 bf16 layer in every config of theirs."""
    def generic(dtype, M, N, K, flags, config, grad_weight=False):
        # Forward: A = x (M, K), B = W^T (K, N) read from W (N, K). dW: A = dz^T (N, M) read from
        # dy (M, N), B = x (M, K); the GEMM is then (N, K) over M.
        a, b = empty(M, K, dtype=dtype), empty(N, K, dtype=dtype)
        args = dict(a_ptr=a, y_ptr=a, b_ptr=b, c_ptr=a, bias_ptr=a, row_sum_ptr=a, M=M, N=N, K=K,
                    stride_am=K, stride_ak=1, stride_ym=K, stride_yk=1, stride_bk=1, stride_bn=K,
                    stride_cm=N, stride_cn=1)
        if grad_weight:
            args.update(M=N, N=K, K=M, stride_am=1, stride_ak=N, stride_ym=1, stride_yk=N, stride_bk=K, stride_bn=1,
                        stride_cm=K)
        constants = dict(ACTIVATION="none", GRAD_OF="none", HAS_BIAS=False, ROW_SUM=False, STORE_C=True,
                         DOT_PRECISION="ieee", ACC_DTYPE=tl.float32, **config.kwargs)
        constants.update(flags)
        name = f"linear generic {str(dtype).replace('torch.', '')}"
        return name, linear._fused_matmul_kernel, args, constants, config.num_warps, config.num_stages

    forward = dict(ACTIVATION="relu", HAS_BIAS=True)
    for dtype, bits in ((torch.bfloat16, 16), (torch.float32, 32)):
        for config in linear._CONFIGS[bits]:
            yield generic(dtype, 4096, 4096, 4096, forward, config)
    small = dict(linear._SMALL_CONFIG)
    small_config = triton.Config({k: small.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, **small)
    yield generic(torch.float32, 64, 128, 784, forward, small_config)
    yield generic(torch.float32, 64, 128, 784, dict(GRAD_OF="relu", ROW_SUM=True), small_config, grad_weight=True)

    uses = {"forward": dict(B_TRANSPOSED=True, ACTIVATION="relu", HAS_BIAS=True),
            "grad_input": dict(GRAD_OF="relu"),
            "grad_weight": dict(A_TRANSPOSED=True, GRAD_OF="relu", ROW_SUM=True)}
    square = empty(4096, 4096)
    for use, flags in uses.items():
        for config in linear._TMA_CONFIGS["GRAD_OF" in flags]:
            constants = dict(A_TRANSPOSED=False, B_TRANSPOSED=False, ACTIVATION="none", GRAD_OF="none",
                             HAS_BIAS=False, ROW_SUM=False, NUM_PROGRAMS=SM_COUNT, **config.kwargs)
            constants.update(flags)
            args = {name: TensorDescriptor.from_tensor(square, block)
                    for name, block in linear._tma_blocks(constants).items()}
            args.update(bias_ptr=square, row_sum_ptr=square, M=4096, N=4096, K=4096)
            yield (f"linear TMA {use}", linear._fused_matmul_tma_kernel, args, constants, config.num_warps,
                   config.num_stages)


def cross_entropy_variants():
    """bf16 logits: vocabulary-sized rows (streamed) and MNIST's 10 classes (one block), plain and
    with weights and label smoothing; the statistics and grad-scaling kernels."""
    for N, C in ((8192, 32000), (4096, 128256), (64, 10)):
        logits, target, weight = empty(N, C), empty(N, dtype=torch.int64), empty(C)
        stats, loss = empty(2, dtype=torch.float32), empty(N, dtype=torch.float32)
        if C == 32000:
            yield ("cross_entropy target stats", cross_entropy._target_stats_kernel,
                   dict(target_ptr=target, weight_ptr=weight, stats_ptr=stats, ok_ptr=empty(1, dtype=torch.int32),
                        N=N, C=C, ignore_index=-100),
                   dict(HAS_WEIGHT=True, SUM_WEIGHT=True, COMPUTE=tl.float32, BLOCK=cross_entropy.STATS_BLOCK), 8, 3)
            yield ("cross_entropy scale grad", cross_entropy._scale_grad_kernel,
                   dict(grad_ptr=logits, grad_output_ptr=loss, grad_output_stride=1, C=C),
                   dict(COMPUTE=tl.float32, BLOCK=cross_entropy.SCALE_BLOCK), 8, 3)
        if C == 10:  # MNIST's batch: the one-program kernel
            block_c = triton.next_power_of_2(C)
            args = dict(logits_ptr=logits, target_ptr=target, weight_ptr=weight, loss_ptr=loss,
                        ok_ptr=empty(1, dtype=torch.int32), grad_ptr=logits, N=N, C=C, ignore_index=-100)
            for smoothing, weighted, reduction in ((0.0, False, 2), (0.1, True, 0)):
                yield ("cross_entropy small batch", cross_entropy._small_cross_entropy_kernel, args,
                       dict(LABEL_SMOOTHING=smoothing, HAS_WEIGHT=weighted, REDUCTION=reduction, COMPUTE_GRAD=True,
                            COMPUTE=tl.float32, BLOCK_N=min(N, cross_entropy.SMALL_TILE // block_c),
                            BLOCK_C=block_c), 4, 3)
        block, num_warps, single = cross_entropy._row_config(C)
        args = dict(logits_ptr=logits, target_ptr=target, weight_ptr=weight, stats_ptr=stats, loss_ptr=loss,
                    grad_ptr=logits, C=C, ignore_index=-100)
        for smoothing, weighted in ((0.0, False), (0.1, True)):
            yield (f"cross_entropy rows C={C}", cross_entropy._cross_entropy_kernel, args,
                   dict(LABEL_SMOOTHING=smoothing, HAS_WEIGHT=weighted, MEAN=True, COMPUTE_GRAD=True,
                        COMPUTE=tl.float32, BLOCK=block, SINGLE_BLOCK=single), num_warps, 3)


def adam_variants():
    """float32 and bfloat16 parameters, plain and with every option, lr on the host and on the device."""
    table = empty(64, dtype=torch.int64)
    for param, options, lr_on_device in ((tl.float32, False, False), (tl.float32, True, True),
                                         (tl.bfloat16, True, False)):
        args = dict(tensors=table, chunks=table, tickets=empty(8, dtype=torch.int32),
                    lr_ptr=empty(1, dtype=torch.float32) if lr_on_device else None, chunk_size=adam.BLOCK * 64,
                    lr_bits=1, beta1_bits=2, beta2_bits=3, eps_bits=4, weight_decay_bits=5)
        constants = dict(PARAM_DTYPE=param, COMPUTE=tl.float32, LR_ON_DEVICE=lr_on_device, HAS_WEIGHT_DECAY=options,
                         DECOUPLED=options, AMSGRAD=options, MAXIMIZE=options, ALIGNED=True, BLOCK=adam.BLOCK)
        yield ("adam", adam.adam_kernel, args, constants, adam.NUM_WARPS, 3)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_compile.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    for variants in (linear_variants(), cross_entropy_variants(), adam_variants()):
        for name, fn, args, constants, num_warps, num_stages in variants:
            print(json.dumps(compile_variant(name, fn, args, constants, num_warps, num_stages)), flush=True)


if __name__ == "__main__":
    main()
