"""dnr-deploy-runtime: only the torch-free modules of ../dnr_deploy, and the compiled kernel.

The sources stay in one place (../dnr_deploy). setuptools takes no path outside the project,
so the modules the sparse engine imports are staged into _staged/ here first (regenerated on
every build; tests/test_runtime_only_install.py checks that torch is absent where they run).
"""

import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
SOURCE, STAGE = HERE.parent / "dnr_deploy", HERE / "_staged"
# package -> the modules it ships (None: all of them)
KEEP = {
    "dnr_deploy": {"__init__", "files", "resources"},
    "dnr_deploy.compress": {"__init__", "checkpoint"},  # the run dir names the manifest cites
    "dnr_deploy.deploydir": None,
    "dnr_deploy.export": {"__init__", "sparse_int8"},  # weights.int8.npz's reader (numpy, onnx)
    "dnr_deploy.runtime": {"__init__"},
    "dnr_deploy.runtime.sparse": {"__init__", "model", "plan", "native", "kernels", "onnx_graph",
                                  "onnx_reader", "onnx_ops", "codegen", "pooling", "run_cli",
                                  "int8", "int8_graph", "winograd", "arena"},
}
KERNELS = ["_kernels.cpp", "_winograd.cpp", "_codegen.cpp", "_int8_kernels.cpp"]


def stage() -> None:
    if SOURCE.is_dir():  # building from the repository (an sdist carries _staged/ itself)
        shutil.rmtree(STAGE, ignore_errors=True)
        for package, keep in KEEP.items():
            folder = SOURCE.joinpath(*package.split(".")[1:])
            target = STAGE.joinpath(*package.split("."))
            target.mkdir(parents=True)
            for module in folder.glob("*.py"):
                if keep is None or module.stem in keep:
                    shutil.copy2(module, target / module.name)
        for kernel in KERNELS:
            shutil.copy2(SOURCE / "runtime" / "sparse" / kernel,
                         STAGE / "dnr_deploy" / "runtime" / "sparse" / kernel)


stage()
openmp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]
setup(
    packages=list(KEEP),
    package_dir={"": "_staged"},
    # the root setup.py's two extensions, with the same flags
    ext_modules=[Extension(
        "dnr_deploy.runtime.sparse._kernels",
        sources=["_staged/dnr_deploy/runtime/sparse/_kernels.cpp",
                 "_staged/dnr_deploy/runtime/sparse/_winograd.cpp",
                 "_staged/dnr_deploy/runtime/sparse/_codegen.cpp"],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", *openmp],
        extra_link_args=openmp,
        optional=True,  # no compiler: install anyway; `pip install .[numba]` for the fallback
    ), Extension(
        # int8 sparse kernels; exact float epilogue: no fused multiply-adds
        "dnr_deploy.runtime.sparse._int8_kernels",
        sources=["_staged/dnr_deploy/runtime/sparse/_int8_kernels.cpp"],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", *openmp],
        extra_link_args=openmp,
        optional=True,  # no compiler: the int8 layers run their numpy reference
    )],
)
