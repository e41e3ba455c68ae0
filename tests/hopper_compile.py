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
first layer on the small-problem tile in fp32 and fp64. The other kernels: cross-entropy over vocabulary-sized
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


def recorded_launches(module, run) -> list[tuple]:
    """(kernel, arguments by name, num_warps, num_stages) of each launch that ``run()`` makes
    through ``module``'s kernels, which are replaced by recorders that launch nothing. A launch's
    ``ok_ptr`` flag is set as the kernel sets it for valid inputs, for launchers that check it."""
    launches = []
    kernels = {name: fn for name, fn in vars(module).items() if isinstance(fn, triton.runtime.jit.JITFunction)}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, num_stages=3, **kwargs):
                named = {**dict(zip(self.fn.arg_names, args)), **kwargs}
                launches.append((self.fn, named, num_warps, num_stages))
                if "ok_ptr" in named:
                    named["ok_ptr"].fill_(1)
            return launch

    try:
        for name, fn in kernels.items():
            setattr(module, name, Recorder(fn))
        run()
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)
    return launches


def split_constexprs(fn, named: dict) -> tuple[dict, dict]:
    """(run-time arguments, constexprs) of a launch's arguments by name."""
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    return ({k: v for k, v in named.items() if k not in constexpr}, {k: v for k, v in named.items() if k in constexpr})


def recorded_linear_launches(run) -> list[tuple[list, dict]]:
    """(tiles, arguments) of each GEMM that ``run()`` launches through linear's launcher: the
    small-problem tile for a direct launch, the tiles its autotuner would time for a tuned one."""
    tuned = []

    class Autotuner:  # stands in for what _autotuned returns: records instead of timing
        def __init__(self, key):
            self.key = key

        def __getitem__(self, grid):
            return lambda **args: tuned.append((linear.fitting_tiles(*self.key[:4]), args))

    real = linear._autotuned
    linear._autotuned = lambda *key: Autotuner(key)
    try:
        direct = recorded_launches(linear, run)
    finally:
        linear._autotuned = real
    return [([linear.SMALL_TILE], args) for _, args, _, _ in direct] + tuned


def linear_variants():
    """Every launch of linear's launcher on an output head past 2^31 elements (x 16384 x 4096,
    W 131072 x 4096: y, dy and their products cross 2^31) in bf16 and fp32, relu, in every tile
    of its table: the generic kernel's forward, dx and dW with db, and the TMA kernel's (which the
    launcher picks on a Hopper GPU); MNIST's first layer on the small-problem tile in fp32 and
    fp64 (which exists for the interpreter's tests, but CUDA tensors take it too)."""
    M, N, K = 16384, 131072, 4096
    uses = ("forward", "grad_input", "grad_weight")
    for dtype in (torch.bfloat16, torch.float32):
        x, w, b = empty(M, K, dtype=dtype), empty(N, K, dtype=dtype), empty(N, dtype=dtype)
        y = empty(M, N, dtype=dtype)

        def layer(x=x, w=w, b=b, y=y):
            linear.forward(x, w, b, "relu")
            linear.backward(y, x, w, y, "relu", True, True, True)

        def tma_layer(x=x, w=w, b=b, y=y):  # the GEMMs of layer() as gemm() gives them to matmul_tma on a GPU
            linear.matmul_tma(x, w.t(), y, bias=b, activation="relu", num_programs=SM_COUNT)
            linear.matmul_tma(y, w, x, y=y, grad_of="relu", num_programs=SM_COUNT)  # outputs: any of their shape
            linear.matmul_tma(y.t(), x, w, y=y.t(), row_sum=b, grad_of="relu", num_programs=SM_COUNT)

        name = str(dtype).replace("torch.", "")
        forms = [("generic", linear._fused_matmul_kernel, layer)]
        if dtype == torch.bfloat16:
            forms.append(("TMA", linear._fused_matmul_tma_kernel, tma_layer))
        for form, kernel, run in forms:
            for use, (tiles, args) in zip(uses, recorded_linear_launches(run)):
                yield from _gemm_variants(f"linear {form} {name} {use}", kernel, tiles, args, dtype, form == "TMA")
    for dtype in (torch.float32, torch.float64):
        x, w, b, y = empty(64, 784, dtype=dtype), empty(128, 784, dtype=dtype), empty(128, dtype=dtype), empty(
            64, 128, dtype=dtype)
        launches = recorded_linear_launches(lambda: (linear.forward(x, w, b, "relu"),
                                                     linear.backward(y, x, w, y, "relu", False, True, True)))
        name = str(dtype).replace("torch.", "")
        for use, (tiles, args) in zip(("forward", "grad_weight"), launches):
            yield from _gemm_variants(f"linear small {name} {use}", linear._fused_matmul_kernel, tiles, args, dtype,
                                      False)


def _gemm_variants(name, kernel, tiles, args, dtype, tma):
    """One variant per tile of a recorded GEMM launch, with the launcher's shared memory estimate."""
    runtime, flags = split_constexprs(kernel, args)
    prologue = flags["GRAD_OF"] != "none"
    for tile in tiles:
        config = linear._config(tile)
        constants = {**flags, **config.kwargs}
        if tma:
            linear._set_tma_blocks({**runtime, **constants})  # the autotuner's pre-hook, as before each config
        estimate = linear.shared_memory(tile, dtype.itemsize, prologue, tma)
        yield name, kernel, runtime, constants, config.num_warps, config.num_stages, {"shared_estimate": estimate}


def cross_entropy_variants():
    """What cross_entropy's launcher launches for bf16 logits: vocabulary-sized rows (streamed; the
    last shape has 2^31 logits), rows of 10 classes in a large batch (one block) and MNIST's batch
    (the one-program kernel), each plain and with weights and label smoothing, and the backward's
    gradient scaling."""
    for N, C in ((8192, 32000), (4096, 128256), (16384, 131072), (4096, 10), (64, 10)):
        logits, target, weight = empty(N, C), torch.zeros(N, dtype=torch.int64), empty(C)

        def run(logits=logits, target=target, weight=weight):
            cross_entropy.forward(logits, target, None, -100, 0.0, "mean", logits)
            cross_entropy.forward(logits, target, weight, -100, 0.1, "none", logits)
            cross_entropy.backward(logits, empty(N, dtype=torch.float32))

        for fn, named, num_warps, num_stages in recorded_launches(cross_entropy, run):
            runtime, constants = split_constexprs(fn, named)
            yield (f"cross_entropy {fn.__name__.strip('_')} C={C}", fn, runtime, constants, num_warps, num_stages)


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
