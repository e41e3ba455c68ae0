"""The C++ kernels build beyond this machine and its compiler: with clang, the compiler of macOS,
for Apple silicon and Intel Macs, and for 64-bit ARM Linux (Graviton, Ampere, Raspberry Pi), where
the portable variant of each kernel is the one that runs.

No such machine is at hand, so every csrc/*.cpp is compiled for those targets by the clang that
the ziglang package carries, with each target's C and C++ headers (a test dependency; the test
skips where it is not installed). This catches what GCC accepts and clang does not (GCC's
__builtin_shuffle, for one) and what only exists on Linux or x86 outside its guards. The clang
build for x86-64 Linux was run against the kernel tests by hand (see the README)."""
import glob
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(Path(p).name for p in glob.glob(str(REPO / "csrc" / "*.cpp")))
TARGETS = ("aarch64-macos", "x86_64-macos", "aarch64-linux-gnu")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_with_clang_for(target, source, tmp_path):
    pytest.importorskip("ziglang", reason="the clang cross-compiler comes with `pip install ziglang`")
    pybind11 = pytest.importorskip("pybind11")
    command = [sys.executable, "-m", "ziglang", "c++", "-target", target, "-std=c++17", "-O0", "-c",
               "-o", str(tmp_path / "out.o"), f"-I{REPO / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
               f"-I{pybind11.get_include()}", str(REPO / "csrc" / source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{source} does not compile for {target} with clang:\n{done.stderr[-4000:]}"
