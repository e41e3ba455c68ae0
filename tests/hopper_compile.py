"""Compiles every Triton kernel of the library for Hopper (sm_90) without a GPU, and reports, one
JSON line per kernel variant, what the compiler made of it: shared memory (and, for the GEMMs, the
launcher's estimate of it), register spills (from ptxas -v), vector loads, whether the matrix
kernels use wgmma and the TMA ones bulk tensor copies, and every 32-bit multiply by a run-time
argument that feeds a pointer offset (``narrow_offsets``: such a product overflows on tensors of
2^31 elements or more). Each variant is specialised as Triton's launcher would specialise a real
launch on representative inputs.

The GEMM variants are what linear's launcher launches, recorded by running its ``forward`` and
``backward`` (and ``matmul_tma``) with the kernels replaced by recorders, so the tile tables, the
small-problem tile and the arguments come from the launcher itself: an output head of
16384 x 131072 (2^31 outputs) in bf16 and fp32 in every autotuner config of each use, and MNIST's
first layer on the small-problem tile. The other kernels: cross-entropy over vocabulary-sized
rows and MNIST's batch, Adam and SGD.

Triton's wheel bundles ptxas, so this runs on any machine: tests/test_hopper_compile.py runs it
in CI, and ``PYTHONPATH=<another triton's site-packages> python tests/hopper_compile.py`` checks
another Triton version (the device machine has 3.6). It must run without TRITON_INTERPRET.
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

from kernels.triton import adam, cross_entropy, linear, sgd  # noqa: E402

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


# Ops that only reshape or move a value: a kernel argument passed through them is still that argument.
_RESHAPES = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "ttg.convert_layout"}
_DEF = re.compile(r"^\s*(%[\w]+)(?::\d+)? = ([\w.]+)(.*)$")
_ITER_ARGS = re.compile(r"(%[\w]+) = (%[\w#]+)")


def narrow_offsets(ttir: str) -> list[str]:
    """The 32-bit multiplies by a run-time kernel argument (a stride or a size, not a constant)
    that feed the offset of a ``tt.addptr``, as lines of the Triton IR. Index times stride is the
    product that grows with a tensor; a grid index times a block size is bounded by the grid."""
    defs: dict[str, tuple[str, list[str], str]] = {}  # value -> (op, operands, the line)
    args: set[str] = set()
    for line in ttir.splitlines():
        if "tt.func" in line:
            args.update(re.findall(r"(%[\w]+): ", line))
        for name, init in _ITER_ARGS.findall(line.split("iter_args(", 1)[1]) if "iter_args(" in line else ():
            defs[name] = ("iter_arg", [init], line)
        match = _DEF.match(line)
        if match:
            name, op, rest = match.groups()
            operands = re.findall(r"%[\w]+", rest.split(" : ")[0].split("iter_args(")[0])
            defs[name] = (op, operands, line.strip())

    def is_argument(value: str) -> bool:
        if value in args:
            return True
        op, operands, _ = defs.get(value, ("", [], ""))
        return op in _RESHAPES and bool(operands) and is_argument(operands[0])

    found, seen = [], set()

    def walk(value: str) -> None:
        if value in seen or value not in defs:
            return
        seen.add(value)
        op, operands, line = defs[value]
        if op == "arith.muli" and re.search(r"\bi32\b|xi32\b", line.split(" : ")[-1]) and any(
                is_argument(v) for v in operands):
            found.append(line)
        for v in operands:
            walk(v)

    for op, operands, _ in list(defs.values()):
        if op == "tt.addptr" and len(operands) == 2:
            walk(operands[1])
    return found


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
            "narrow_offsets": narrow_offsets(compiled.asm["ttir"]),
            "variant": {k: str(v) for k, v in constants.items()}, "num_warps": num_warps, "num_stages": num_stages}


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype)


class _Recorder:
    """Stands in for a kernel (or an autotuner) of linear's launcher: ``[grid](**args)`` records
    the arguments, with ``tiles``, the configs that launch would run, and launches nothing."""

    def __init__(self, launches: list, tiles_of):
        self.launches, self.tiles_of = launches, tiles_of

    def __getitem__(self, grid):
        return lambda **args: self.launches.append((self.tiles_of(args), args))


def recorded_linear_launches(run) -> list[tuple[list, dict]]:
    """(tiles, arguments) of each GEMM that ``run()`` launches through linear's launcher."""
    launches = []
    small = _Recorder(launches, lambda args: [linear.SMALL_TILE])
    real_kernel, real_autotuned = linear._fused_matmul_kernel, linear._autotuned
    linear._fused_matmul_kernel = small
    linear._autotuned = lambda *key: _Recorder(launches, lambda args: linear.fitting_tiles(*key[:4]))
    try:
        run()
    finally:
        linear._fused_matmul_kernel, linear._autotuned = real_kernel, real_autotuned
    return launches


def linear_variants():
    """Every launch of linear's launcher on an output head past 2^31 elements (x 16384 x 4096,
    W 131072 x 4096: y, dy and their products cross 2^31) in bf16 and fp32, relu, in every tile
    of its table: the generic kernel's forward, dx and dW with db, and the TMA kernel's (which the
    launcher picks on a Hopper GPU); MNIST's first layer on the small-problem tile."""
    M, N, K = 16384, 131072, 4096
    uses = ("forward", "grad_input", "grad_weight")
    for dtype in (torch.bfloat16, torch.float32):
        x, w, b = empty(M, K, dtype=dtype), empty(N, K, dtype=dtype), empty(N, dtype=dtype)
        y = empty(M, N, dtype=dtype)

        def layer(x=x, w=w, b=b, y=y):
            linear.forward(x, w, b, "relu")
            linear.backward(y, x, w, y, "relu", True, True, True)

        def tma_layer(x=x, w=w, b=b, y=y):
            out = {"forward": y, "grad_input": x, "grad_weight": w}
            linear.matmul_tma(x, w.t(), out["forward"], bias=b, activation="relu", num_programs=SM_COUNT)
            linear.matmul_tma(y, w, out["grad_input"], y=y, grad_of="relu", num_programs=SM_COUNT)
            linear.matmul_tma(y.t(), x, out["grad_weight"], y=y.t(), row_sum=b, grad_of="relu", num_programs=SM_COUNT)

        name = str(dtype).replace("torch.", "")
        forms = [("generic", linear._fused_matmul_kernel, layer)]
        if dtype == torch.bfloat16:
            forms.append(("TMA", linear._fused_matmul_tma_kernel, tma_layer))
        for form, kernel, run in forms:
            for use, (tiles, args) in zip(uses, recorded_linear_launches(run)):
                yield from _gemm_variants(f"linear {form} {name} {use}", kernel, tiles, args, dtype, form == "TMA")
    x, w, b = empty(64, 784, dtype=torch.float32), empty(128, 784, dtype=torch.float32), empty(128, dtype=torch.float32)
    y = empty(64, 128, dtype=torch.float32)
    launches = recorded_linear_launches(lambda: (linear.forward(x, w, b, "relu"),
                                                 linear.backward(y, x, w, y, "relu", False, True, True)))
    for use, (tiles, args) in zip(("forward", "grad_weight"), launches):
        yield from _gemm_variants(f"linear small float32 {use}", linear._fused_matmul_kernel, tiles, args,
                                  torch.float32, False)


def _gemm_variants(name, kernel, tiles, args, dtype, tma):
    """One variant per tile of a recorded GEMM launch, with the launcher's shared memory estimate."""
    constexpr = {p.name for p in kernel.params if p.is_constexpr}
    runtime = {k: v for k, v in args.items() if k not in constexpr}
    flags = {k: v for k, v in args.items() if k in constexpr}
    prologue = flags["GRAD_OF"] != "none"
    for tile in tiles:
        config = linear._config(tile)
        constants = {**flags, **config.kwargs}
        if tma:
            linear._set_tma_blocks({**runtime, **constants})  # the autotuner's pre-hook, as before each config
        estimate = linear.shared_memory(tile, min(dtype.itemsize, 4), prologue, tma)
        yield name, kernel, runtime, constants, config.num_warps, config.num_stages, {"shared_estimate": estimate}


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
            for smoothing, weighted, reduction in ((0.0, False, "mean"), (0.1, True, "none")):
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
    """float32 and bfloat16 parameters, plain and with every option, lr and betas on the host and on the device."""
    table = empty(64, dtype=torch.int64)
    bits = adam.float_bits
    for param, options, on_device in ((tl.float32, False, False), (tl.float32, True, True),
                                      (tl.bfloat16, True, False)):
        scalar = empty(1, dtype=torch.float32) if on_device else None
        args = dict(tensors=table, chunks=table, tickets=empty(8, dtype=torch.int32), lr_ptr=scalar,
                    beta1_ptr=scalar, beta2_ptr=scalar, chunk_size=adam.BLOCK * 64, lr_bits=bits(1e-3),
                    beta1_bits=bits(0.9), beta2_bits=bits(0.999), eps_bits=bits(1e-8), weight_decay_bits=bits(1e-2))
        constants = dict(PARAM_DTYPE=param, COMPUTE=tl.float32, LR_ON_DEVICE=on_device, BETAS_ON_DEVICE=on_device,
                         HAS_WEIGHT_DECAY=options, DECOUPLED=options, AMSGRAD=options, MAXIMIZE=options,
                         ALIGNED=True, BLOCK=adam.BLOCK)
        yield ("adam", adam.adam_kernel, args, constants, adam.NUM_WARPS, 3)


def sgd_variants():
    """float32 and bfloat16 parameters: plain, and momentum with every option and lr on the device."""
    table = empty(64, dtype=torch.int64)
    bits = adam.float_bits
    for param, options, on_device in ((tl.float32, False, False), (tl.float32, True, True),
                                      (tl.bfloat16, True, False)):
        args = dict(tensors=table, chunks=table, tickets=empty(8, dtype=torch.int32),
                    lr_ptr=empty(1, dtype=torch.float32) if on_device else None, chunk_size=adam.BLOCK * 64,
                    lr_bits=bits(1e-2), momentum_bits=bits(0.9), dampening_bits=bits(0.1), weight_decay_bits=bits(1e-4))
        constants = dict(PARAM_DTYPE=param, COMPUTE=tl.float32, LR_ON_DEVICE=on_device, HAS_WEIGHT_DECAY=options,
                         MOMENTUM=options, NESTEROV=options, MAXIMIZE=options, ALIGNED=True, BLOCK=adam.BLOCK)
        yield ("sgd", sgd.sgd_kernel, args, constants, adam.NUM_WARPS, 3)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_compile.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    for variants in (linear_variants(), cross_entropy_variants(), adam_variants(), sgd_variants()):
        for name, fn, args, constants, num_warps, num_stages, *extra in variants:
            report = compile_variant(name, fn, args, constants, num_warps, num_stages)
            print(json.dumps({**report, **(extra[0] if extra else {})}), flush=True)


if __name__ == "__main__":
    main()
