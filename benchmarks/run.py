"""Run the benchmarks: ``python -m benchmarks.run [--ops linear,cross_entropy,adam,e2e] [--device cuda|cpu]``.

Prints each op's table and writes JSON, markdown and a plot to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from benchmarks.harness import RESULTS_DIR

ALL_OPS = ("linear", "cross_entropy", "adam", "e2e")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated subset of {','.join(ALL_OPS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases, for a smoke run")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON, markdown and PNG files")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(ALL_OPS))
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(ALL_OPS)}")

    from pathlib import Path

    for op in ops:
        module = importlib.import_module(f"benchmarks.bench_{op}")
        results = module.run(torch.device(args.device), quick=args.quick)
        print(results.markdown(), flush=True)
        for path in results.save(Path(args.out)):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
