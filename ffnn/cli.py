"""What the three commands share: their common options, device choice, the machine they run
on, and error reporting."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import torch

from ffnn.data import CLASSES, NORMALIZATIONS
from ffnn.errors import FFNNError
from ffnn.launch import INTERRUPTED
from ffnn.model import IMPLS


def add_data_options(p: argparse.ArgumentParser, unset: str = "the checkpoint's") -> None:
    """--dataset and --normalize (``unset`` says what leaving them out means), --data-dir, --no-download."""
    p.add_argument("--dataset", choices=tuple(CLASSES), help=f"which dataset (default: {unset})")
    p.add_argument("--normalize", choices=tuple(NORMALIZATIONS),
                   help="pixels as the model sees them: none = 0..255, unit = [0, 1] (ToTensor), "
                        "tutorial = [-1, 1] (ToTensor + Normalize(0.5, 0.5)) (default: the checkpoint's, else tutorial)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the IDX files (gzipped or not), or where to download them "
                        "(default: ./data; for fashion-mnist /usr/share/datasets/fashion-mnist when installed)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download: fail when the files are not in --data-dir")


def add_device_options(p: argparse.ArgumentParser, impl_unset: str | None = None) -> None:
    """--device and --impl; --impl defaults to fused unless ``impl_unset`` says what leaving it out means."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available, else cpu (default: %(default)s)")
    p.add_argument("--impl", choices=IMPLS, default=None if impl_unset else "fused",
                   help="fused: this library's kernels; torch: nn.Linear, F.cross_entropy, torch.optim "
                        f"(default: {impl_unset or 'fused'})")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise FFNNError("--device cuda: no CUDA device is visible (use --device cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where the kernel reports them
    (a virtual machine's name can be as bare as "AMD EPYC", which spans Zen 1 to Zen 5)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_summary() -> str:
    """The CPU a figure was measured on: model, cores, the SIMD path of the C++ kernels and of
    PyTorch's own CPU kernels, threads."""
    try:
        from kernels import _C

        simd = f"SIMD {_C.isa()}"
    except ImportError:
        simd = "C++ kernels not built"
    simd += f" (PyTorch {torch.backends.cpu.get_cpu_capability()})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, {simd}, {torch.get_num_threads()} threads"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; an FFNNError (bad input) becomes one line on stderr and exit status 2, and
    Ctrl-C that the command did not handle itself ends it with status 130, without a traceback."""
    try:
        return command(args)
    except FFNNError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
