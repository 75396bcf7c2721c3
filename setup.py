"""Builds csrc/*.cpp into ctrlsafe._C (pybind11 + OpenMP). Everything else is in pyproject.toml.

The extension takes raw data pointers from Python instead of torch tensors, so it never links
against libtorch: the build needs only pybind11 and a C++17 compiler.
CTRLSAFE_NATIVE=1 adds -march=native (faster on the build machine, not portable).
"""
import os
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

compile_args = ["-O3", "-std=c++17"]
link_args = []
if sys.platform != "darwin":
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if os.environ.get("CTRLSAFE_NATIVE") == "1":
    compile_args.append("-march=native")

setup(
    ext_modules=[
        Pybind11Extension(
            "ctrlsafe._C",
            sorted(glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
