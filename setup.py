"""Builds the C++ CPU kernels in csrc/ into the extension module kernels._C.

The extension does not link against libtorch: tensors cross as raw data pointers whose
shapes, dtypes and strides the Python layer has already checked. Each kernel is compiled
for AVX-512, AVX2+FMA and portable x86-64 in the same object (see csrc/common.h) and the
variant is picked at run time, so the default build never uses -march=native.
"""
import glob
import os

import shutil

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


class BuildExt(build_ext):
    """Copies the built module into the source tree by rename, not by overwriting: a Python
    process that has kernels._C loaded keeps its mapped file, so rebuilding while tests run
    never crashes them."""

    def copy_file(self, src, dst, *args, **kwargs):
        if not (self.inplace and dst.endswith((".so", ".pyd"))):
            return super().copy_file(src, dst, *args, **kwargs)
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
        return dst, True

extra_compile_args = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno"]
if os.environ.get("KERNELS_NATIVE") == "1":  # opt-in for a local build tuned to this CPU
    extra_compile_args.append("-march=native")

ext_modules = [
    Pybind11Extension(
        "kernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob.glob("csrc/*.h")),
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
