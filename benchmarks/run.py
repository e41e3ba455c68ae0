"""Run the benchmarks: ``python -m benchmarks.run [--ops linear,cross_entropy,adam,e2e] [--device cuda|cpu] [--quick] [--update]``.

Prints each op's table and writes JSON, markdown and a plot per op: into runs/benchmarks/ (a
scratch directory) by default, into the committed benchmarks/results/ only with --update, or
wherever --out says. --quick, a smoke run, runs fewer and smaller cases, times each for less and
leaves out the peers that must compile first (torch.compile), so its figures are rough and
incomplete: it cannot --update.
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
    out = harness.RESULTS_DIR if args.update else Path(args.out or harness.SCRATCH_DIR)

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
