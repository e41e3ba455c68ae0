"""Run the benchmarks: ``python -m benchmarks.run [--ops linear,cross_entropy,adam,e2e] [--device cuda|cpu] [--isa avx2] [--quick] [--update]``.

Prints each op's table and writes JSON, markdown and a plot per op: into runs/benchmarks/ (a
scratch directory) by default, into the committed benchmarks/results/ only with --update, or
wherever --out says. --quick, a smoke run, runs fewer and smaller cases, times each for less and
leaves out the peers that must compile first (torch.compile), so its figures are rough and
incomplete: it cannot --update.

--isa avx2 measures, on a CPU with AVX-512, what a CPU with AVX2 only (AMD's EPYC before Zen 4,
Intel's desktop parts) runs: the C++ kernels' AVX2 build, and PyTorch's own CPU kernels, MKL and
oneDNN each limited to AVX2 through the variables of ``harness.AVX2_ENVIRONMENT``. Those are read when
the libraries load, so the run starts again in a new process with them set.

A CPU's tables are named after the machine (``harness.cpu_tag``): ``<op>_cpu_<brand>-<SIMD>.*``,
``linear_cpu_epyc-avx512.md`` say, and an --isa run's ``<op>_cpu_<brand>-<SIMD>_as-avx2.*``, so
that the figures of each machine the project is measured on sit side by side.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from benchmarks import harness

ALL_OPS = ("linear", "cross_entropy", "adam", "e2e")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated subset of {','.join(ALL_OPS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    harness.add_isa_option(p)
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases, shorter timing: a smoke run")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--update", action="store_true", help="write the committed tables in benchmarks/results/")
    where.add_argument("--out", help=f"directory for the JSON, markdown and PNG files (default {harness.SCRATCH_DIR})")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.quick and args.update:
        p.error("--update writes the committed tables, which --quick's rough figures must not replace")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(ALL_OPS))
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(ALL_OPS)}")
    if args.isa and args.device != "cpu":
        p.error("--isa chooses the CPU's instruction set: it needs --device cpu")
    out = harness.RESULTS_DIR if args.update else Path(args.out or harness.SCRATCH_DIR)

    if args.isa:
        status = harness.run_as_isa(p, args.isa, "benchmarks.run", argv)
        if status is not None:
            return status
        harness.set_variant(args.isa)
    harness.set_quick(args.quick)
    for op in ops:
        module = importlib.import_module(f"benchmarks.bench_{op}")
        results = module.run(torch.device(args.device), quick=args.quick)
        print(results.markdown(), flush=True)
        for path in results.save(out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
