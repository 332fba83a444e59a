"""The compiled convolution kernel (_kernels.cpp, built by setup.py), loaded with ctypes.

`native_conv` is None when the library was not built (no C++ compiler at install, or a source
tree used without `python setup.py build_ext --inplace`); the runtime then uses the numba
kernel and records `kernel: "numba"` in its reports.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _load() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_kernels{suffix}"
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError:  # built for another platform or damaged: the numba kernel runs
                return None
    return None


_LIB = _load()
if _LIB is not None:
    # raw pointers: ndpointer's per-argument checks cost microseconds a call, and a batch-1
    # VGG16 makes 13 calls; `native_conv` checks dtypes and contiguity once instead
    _PTR = ctypes.c_void_p
    _LIB.dnr_sparse_conv.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                     _PTR]
    _LIB.dnr_sparse_conv.restype = None
    _LIB.dnr_sparse_avx2.restype = ctypes.c_int


def kernel_name() -> str:
    """Which convolution kernel runs: "cpp-avx2", "cpp" (portable) or "numba"."""
    if _LIB is None:
        return "numba"
    return "cpp-avx2" if _LIB.dnr_sparse_avx2() else "cpp"


def conv_call(src: np.ndarray, offsets: np.ndarray, indptr: np.ndarray, values: np.ndarray,
              bias: np.ndarray, relu: bool, block: int, vectors: int, threads: int,
              out: np.ndarray) -> Callable[[], None]:
    """A call of the kernel on these arrays, bound once: out (rows, length) = the sparse
    convolution of _kernels.cpp; length % (8 * vectors) == 0. The caller keeps the arrays
    alive as long as the call."""
    arrays = (src, offsets, indptr, values, bias, out)
    if any(not a.flags.c_contiguous for a in arrays) or out.dtype != np.float32 or \
            src.dtype != np.float32 or offsets.dtype != np.int64 or indptr.dtype != np.int64:
        raise TypeError("the sparse kernel takes C-contiguous float32 / int64 arrays")
    rows, length = out.shape
    return functools.partial(_LIB.dnr_sparse_conv, *(a.ctypes.data for a in arrays[:5]),
                             int(relu), rows, length, block, vectors, threads, out.ctypes.data)


available = _LIB is not None
