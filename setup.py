"""The compiled pieces: the sparse runtime's float and int8 kernels (metadata: pyproject.toml).

A plain C ABI shared library loaded with ctypes (dnr_deploy/runtime/sparse/native.py); when it
cannot be built or loaded, the runtime falls back to its numba kernel and says so.
"""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" or sys.platform == "win32" else ["-fopenmp"]
setup(ext_modules=[Extension(
    "dnr_deploy.runtime.sparse._kernels",
    sources=["dnr_deploy/runtime/sparse/_kernels.cpp",
             "dnr_deploy/runtime/sparse/_winograd.cpp",
             "dnr_deploy/runtime/sparse/_codegen.cpp"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", *openmp],
    extra_link_args=openmp,
    optional=True,  # no compiler: install anyway, the numba kernel runs
), Extension(
    # int8 sparse kernels (int8.py); exact float epilogue: no fused multiply-adds
    "dnr_deploy.runtime.sparse._int8_kernels",
    sources=["dnr_deploy/runtime/sparse/_int8_kernels.cpp"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", *openmp],
    extra_link_args=openmp,
    optional=True,  # no compiler: the int8 op runs its numpy reference
)])
