"""The benchmark harness every op uses: timing, a results table, and its JSON, markdown and
plot (the committed tables in benchmarks/results/, an ad-hoc run's in a scratch directory).

Each benchmarks/bench_<op>.py defines ``run(device, quick) -> Results``: it times ours and the
peers on the same inputs in the same process and records each as one row of a case. Every
table names the machine it was measured on (on a CPU: model, cores, the C++ kernels' SIMD path
and the thread count, all of which move the figures).

The implementations of a case are timed interleaved (``Results.compare``): in rounds, each
round timing every one of them for a short block, in an order that rotates from round to round.
A machine whose speed drifts while a case runs (a shared host can change by 2x within minutes)
then slows all of them alike. A row's time is the median of its rounds, and its ``ours faster
by`` the median over the rounds of its time / ours in the same round: a ratio of two figures
taken under the same conditions, which is what the tables are read for.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ffnn.cli import cpu_model, machine_summary

# What an --isa run sets to hold PyTorch's own vectorised kernels (ATen), MKL's GEMMs and
# oneDNN's to AVX2, as on an AVX2-only CPU (AMD's EPYC before Zen 4, Intel's desktop parts).
AVX2_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed tables
SCRATCH_DIR = Path("runs") / "benchmarks"  # an ad-hoc run's tables
OURS = "ours"
# Seconds of timed calls per row: a full run, and a --quick one (a smoke run, figures rougher).
MIN_TIME = {"full": 0.5, "quick": 0.05}
# Rounds a case's implementations are timed in, interleaved (each round gets MIN_TIME / ROUNDS).
ROUNDS = {"full": 10, "quick": 2}
# Peers whose first call compiles (seconds to tens of seconds per case on a CPU, most of a
# --quick run's time): a --quick run records them as not timed.
COMPILING_PEERS = ("torch.compile",)
_mode = "full"
_variant = ""  # "avx2": an --isa run, whose tables are named <op>_cpu_<machine>_as-avx2


@contextlib.contextmanager
def setting(get: Callable[[], object], set_to: Callable[[object], object], value):
    """``set_to(value)`` inside the block, then back to what ``get()`` gave before it (the thread
    count, the C++ kernels' instruction set)."""
    previous = get()
    set_to(value)
    try:
        yield
    finally:
        set_to(previous)


def set_quick(quick: bool) -> None:
    """Time every row of this process's benchmarks for ``MIN_TIME["quick"]`` seconds instead of the full time."""
    global _mode
    _mode = "quick" if quick else "full"


def add_isa_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--isa", choices=("avx2",), help="run as an AVX2-only CPU would, ours and PyTorch alike (CPU only)")


def run_as_isa(p: argparse.ArgumentParser, isa: str, module: str, argv: list[str] | None) -> int | None:
    """``--isa`` of a benchmark command (``python -m <module> <argv>``, argv None: this process's).
    The libraries read AVX2_ENVIRONMENT when they load, so unless this process started with it,
    the command runs again in a new process that has it, and this returns that process's exit
    status. Otherwise it sets the C++ kernels to ``isa`` too, here, and returns None: go on
    measuring. An instruction set this CPU lacks is the parser's error."""
    if any(os.environ.get(k) != v for k, v in AVX2_ENVIRONMENT.items()):
        command = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env={**os.environ, **AVX2_ENVIRONMENT}).returncode
    from kernels import _C

    try:
        _C.set_isa(isa)
    except ValueError as e:
        p.error(str(e))
    return None


def set_variant(name: str) -> None:
    """Mark this process's tables as run with the instruction set ``name`` (``benchmarks.run --isa``):
    named ``<op>_cpu_<machine>_as-<name>``."""
    global _variant
    _variant = name


def bench(fn: Callable[[], object], device: torch.device, *, min_time: float | None = None) -> float:
    """Median seconds per call of ``fn``: CUDA via triton.testing.do_bench (which flushes L2
    between calls), CPU via torch.utils.benchmark with PyTorch's thread count; ``min_time``
    seconds of calls at least (default: ``MIN_TIME`` of the run's mode)."""
    if min_time is None:
        min_time = MIN_TIME[_mode]
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_time * 1000)), return_mode="median") * 1e-3
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


@dataclass
class Row:
    case: str
    impl: str
    seconds: float | None  # None: the impl could not run this case (reason in note)
    rate: float | None = None  # work per second in `unit`
    unit: str = ""
    note: str = ""
    # Median over the rounds of (this row's time / ours) in the same round; None where not
    # measured so (ours, a row timed alone, or a case without ours).
    speedup: float | None = None


def cpu_tag() -> str:
    """What this CPU's tables are filed under, so that figures from different machines sit side by
    side: the brand in its model name and its best SIMD path (``xeon-avx512``, ``epyc-avx2``)."""
    from kernels import _C

    words = re.sub(r"\((R|TM)\)", " ", cpu_model(), flags=re.IGNORECASE).lower().split()
    brand = next((w for w in words if w not in ("intel", "amd", "genuineintel", "authenticamd")), "cpu")
    return f"{re.sub(r'[^a-z0-9]+', '', brand) or 'cpu'}-{_C.supported_isa()}"


@dataclass
class Results:
    op: str
    device: str
    rows: list[Row] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        dev = torch.device(self.device)
        self.meta.setdefault("device_name", torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model())
        self.meta.setdefault("machine", machine_summary())
        self.meta.setdefault("threads", torch.get_num_threads())
        self.meta.setdefault("mode", _mode)
        if dev.type == "cpu":
            self.meta.setdefault("machine_tag", cpu_tag())
        if _variant:
            self.meta.setdefault("variant", _variant)
        self.meta.setdefault("torch", torch.__version__)
        try:
            import triton

            self.meta.setdefault("triton", triton.__version__)
        except ImportError:
            pass
        self.meta.setdefault("date", datetime.date.today().isoformat())

    def add(self, case: str, impl: str, seconds: float | None, *, work: float | None = None,
            unit: str = "", scale: float = 1.0, note: str = "", speedup: float | None = None) -> None:
        """Record one timing; ``work`` (flops, bytes) per call gives a rate of work/seconds/scale in
        ``unit``; ``speedup`` is the median over interleaved rounds of its time / ours (``compare``)."""
        rate = work / seconds / scale if (work and seconds) else None
        self.rows.append(Row(case, impl, seconds, rate, unit, note, speedup))

    def time(self, case: str, impl: str, fn: Callable[[], object], *, work: float | None = None,
             unit: str = "", scale: float = 1.0, min_time: float | None = None) -> float | None:
        """Time ``fn`` alone and record it (see ``compare``); returns its seconds, None if it raised."""
        return self.compare(case, {impl: fn}, work=work, unit=unit, scale=scale, min_time=min_time)[impl]

    def compare(self, case: str, impls: dict[str, Callable[[], object]], *, work: float | None = None,
                unit: str = "", scale: float = 1.0, min_time: float | None = None) -> dict[str, float | None]:
        """Time the implementations of ``case`` interleaved (the module docstring says how) and
        record one row each, in the order given; returns their seconds. An impl that raises is
        recorded as not run, with the error (a peer that cannot run a case is a result, not a crash)."""
        mode_time = MIN_TIME[_mode] if min_time is None else min_time
        rounds = ROUNDS[_mode]
        device = torch.device(self.device)
        runnable, notes = {}, {}
        for impl, fn in impls.items():
            if _mode == "quick" and impl in COMPILING_PEERS:
                notes[impl] = "not timed in a --quick run"
                continue
            try:
                fn()  # compile / warm up before timing
                runnable[impl] = fn
            except Exception as e:
                notes[impl] = error_note(e)
        times: dict[str, list[float]] = {impl: [] for impl in runnable}  # per round
        for r in range(rounds):
            if not times:
                break
            for impl in in_turn(list(times), r):
                try:
                    times[impl].append(bench(runnable[impl], device, min_time=mode_time / rounds))
                except Exception as e:  # failed after its warm-up call: still a result
                    notes[impl] = error_note(e)
                    del times[impl]
        ours = times.get(OURS)
        seconds = {}
        for impl in impls:
            if impl not in times:
                self.add(case, impl, None, note=notes[impl])
                seconds[impl] = None
                continue
            seconds[impl] = statistics.median(times[impl])
            speedup = None
            if ours is not None and impl != OURS:
                speedup = statistics.median(peer / mine for peer, mine in zip(times[impl], ours))
            self.add(case, impl, seconds[impl], work=work, unit=unit, scale=scale, speedup=speedup)
        return seconds

    def cases(self) -> list[str]:
        return list(dict.fromkeys(r.case for r in self.rows))

    def ours(self, case: str) -> Row | None:
        return next((r for r in self.rows if r.case == case and r.impl == OURS), None)

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"# {self.op} on {m['device_name']} ({self.device}" + (f", {m['variant'].upper()} only" if m.get("variant") else "") + ")",
            "",
            f"{m['date']}, torch {m['torch']}" + (f", triton {m['triton']}" if "triton" in m else "")
            + f"; machine: {m['machine']}" + (" (a --quick run: rough figures)" if m.get("mode") == "quick" else "")
            + (f"; an {m['variant'].upper()}-only CPU emulated: ours and PyTorch's kernels, MKL and oneDNN all held to "
               f"{m['variant'].upper()} (`benchmarks.run --isa {m['variant']}`)" if m.get("variant") else "")
            + f". Median time per {m.get('per', 'call')}; `ours faster by` = peer time / ours (above 1: ours is faster), "
            "the median of that ratio over rounds in which each implementation runs in turn.",
            "",
            "| case | impl | time | rate | ours faster by |",
            "|---|---|---:|---:|---:|",
        ]
        for case in self.cases():
            mine = self.ours(case)
            for r in (r for r in self.rows if r.case == case):
                t = _fmt_time(r.seconds) if r.seconds else f"n/a ({r.note})"
                rate = f"{r.rate:,.2f} {r.unit}" if r.rate else ""
                ratio = f"{r.speedup:.2f}x" if r.speedup else ""
                if not ratio and mine and mine.seconds and r.seconds and r is not mine:
                    ratio = f"{r.seconds / mine.seconds:.2f}x"
                lines.append(f"| {case} | {r.impl} | {t} | {rate} | {ratio} |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        variant = self.meta.get("variant")
        stem = out_dir / "_".join(filter(None, (self.op, torch.device(self.device).type, self.meta.get("machine_tag"),
                                                variant and f"as-{variant}")))
        paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
        paths[0].write_text(json.dumps({"op": self.op, "device": self.device, "meta": self.meta,
                                        "rows": [asdict(r) for r in self.rows]}, indent=1))
        paths[1].write_text(self.markdown())
        self.plot(paths[2])
        return paths

    def plot(self, path: Path) -> None:
        """Grouped bars: time of each impl per case, log scale, ours highlighted."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cases = self.cases()
        impls = list(dict.fromkeys(r.impl for r in self.rows))
        width = 0.8 / max(1, len(impls))
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cases) * max(1, len(impls)) * 0.5), 4.5))
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = next((r for r in self.rows if r.case == case and r.impl == impl and r.seconds), None)
                if r:
                    xs.append(j + (i - (len(impls) - 1) / 2) * width)
                    ys.append(r.seconds * 1e3)
            ax.bar(xs, ys, width, label=impl, edgecolor="black" if impl == OURS else None,
                   linewidth=1.5 if impl == OURS else 0)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"ms per {self.meta.get('per', 'call')} (log scale, lower is better)")
        ax.set_title(f"{self.op}: {self.meta['device_name']} ({self.meta['date']})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def in_turn(names: list, turn: int) -> list:
    """``names`` in the order of round ``turn`` when each round starts one later than the last."""
    return names[turn % len(names):] + names[:turn % len(names)]


def error_note(e: Exception) -> str:
    """How a row that could not be timed says why: the exception's type and first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"
