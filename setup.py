"""Builds the C++ CPU kernels in csrc/ into the extension module kernels._C.

Build requirement: pybind11 >= 2.11 (pyproject.toml's build-system; pip installs it in its
isolated build environment, but with ``--no-build-isolation`` it must already be installed).

The extension does not link against libtorch: tensors cross as raw data pointers whose
shapes, dtypes and strides the Python layer has already checked. (The optimizers' per-step table
check, csrc/param_table.cpp, is the one piece that reads Python objects, through CPython's API.) Each kernel is compiled
for AVX-512, AVX2+FMA and portable x86-64 in the same object (see csrc/common.h) and the
variant is picked at run time, so the default build never uses -march=native.

The sources compile in parallel, one compiler per core (``NPY_NUM_BUILD_JOBS=N`` sets the
number), the kernels at -O3 and the module definition, which holds no kernel, at -O1.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
except ImportError:
    sys.exit("error: building the C++ extension kernels._C needs pybind11 >= 2.11, which is not installed. "
             "Install it (`pip install pybind11`) or let pip build in an isolated environment "
             "(leave out --no-build-isolation).")

# Sources without kernel code: -O3 buys them nothing but compile time.
NO_KERNEL_CODE = {"bindings.cpp"}


class BuildExt(build_ext):
    """Compiles the sources without kernel code at -O1; copies the built module into the
    source tree by rename, not by overwriting: a Python process that has kernels._C loaded
    keeps its mapped file, so rebuilding while tests run never crashes them."""

    def build_extensions(self):
        # _compile(obj, src, ...) is the one-source step that distutils' compile loop, and
        # pybind11's parallel one, call per file: the place for a per-file flag.
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if os.path.basename(src) in NO_KERNEL_CODE:
                extra_postargs = [*extra_postargs, "-O1"]  # the last -O on the command line wins
            compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()

    def copy_file(self, src, dst, *args, **kwargs):
        if not (self.inplace and dst.endswith((".so", ".pyd"))):
            return super().copy_file(src, dst, *args, **kwargs)
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
        return dst, True


# -pthread: the kernels' thread pool (csrc/common.h); no OpenMP runtime beside PyTorch's.
extra_compile_args = ["-O3", "-pthread", "-Wno-psabi", "-fno-math-errno"]
extra_link_args = ["-pthread", "-ldl"]  # -ldl: dl_iterate_phdr/dlopen find PyTorch's OpenMP runtime (csrc/common.h)
if os.environ.get("KERNELS_NATIVE") == "1":  # opt-in for a local build tuned to this CPU
    extra_compile_args.append("-march=native")
if os.environ.get("KERNELS_SANITIZE") == "1":  # AddressSanitizer, UBSan, libstdc++'s checks: see README
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    extra_compile_args += [*sanitize, "-D_GLIBCXX_ASSERTIONS", "-g", "-O1"]  # -O1: builds in a fraction of -O3's time
    extra_link_args += sanitize

ext_modules = [
    Pybind11Extension(
        "kernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob.glob("csrc/*.h")),
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        cxx_std=17,
    )
]

ParallelCompile("NPY_NUM_BUILD_JOBS").install()
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
