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
from dataclasses import dataclass
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
    _I64 = ctypes.c_int64
    _LIB.dnr_sparse_conv.argtypes = [_PTR]
    _LIB.dnr_sparse_conv.restype = None
    _LIB.dnr_max_pool.argtypes = [_PTR, *[_I64] * 7, _PTR, _I64, _I64]
    _LIB.dnr_max_pool.restype = None
    _LIB.dnr_split_phases.argtypes = [_PTR, *[_I64] * 8, _PTR, _PTR, _I64, _I64]
    _LIB.dnr_split_phases.restype = None
    _LIB.dnr_global_avg_pool.argtypes = [_PTR, *[_I64] * 6, _PTR]
    _LIB.dnr_global_avg_pool.restype = None
    _LIB.dnr_sparse_avx2.restype = ctypes.c_int
    _LIB.dnr_sparse_avx512.restype = ctypes.c_int
    if hasattr(_LIB, "dnr_winograd_input"):  # a library built before it lacks them
        _LIB.dnr_winograd_input.argtypes = [_PTR]
        _LIB.dnr_winograd_input.restype = None
        _LIB.dnr_winograd_output.argtypes = [_PTR]
        _LIB.dnr_winograd_output.restype = None
        _LIB.dnr_winograd_has_path.argtypes = [ctypes.c_int64]
        _LIB.dnr_winograd_has_path.restype = ctypes.c_int
    if hasattr(_LIB, "dnr_winograd_gemms"):  # nor this one
        _LIB.dnr_winograd_gemms.argtypes = [_PTR]
        _LIB.dnr_winograd_gemms.restype = None


def kernel_name() -> str:
    """Which convolution kernel runs: "cpp-avx512" (16-float vectors where a chunk of 8 images
    fills them, AVX2 elsewhere), "cpp-avx2", "cpp" (portable) or "numba"."""
    if _LIB is None:
        return "numba"
    if _LIB.dnr_sparse_avx512():
        return "cpp-avx512"
    return "cpp-avx2" if _LIB.dnr_sparse_avx2() else "cpp"


class ConvArgs(ctypes.Structure):
    """_kernels.cpp's ConvArgs: one call's arguments, converted once."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("src", "off", "indptr", "val", "bias",
                                                      "pos")] + \
        [(name, ctypes.c_int64) for name in ("npos", "block", "rows", "threads", "relu")] + \
        [("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64), ("res", ctypes.c_void_p),
         ("res_stride", ctypes.c_int64), ("width", ctypes.c_int64), ("segments", ctypes.c_int64),
         ("seg", ctypes.c_void_p), ("group", ctypes.c_int64)]


@dataclass(frozen=True)
class Segments:
    """A layer's nonzeros cut into segments of input channels, segment-major (the kernel then
    runs each segment over a few tiles of positions while their input stays in cache): row o's
    nonzeros of segment s are offsets[j], values[j] for indptr[s * rows + o] <= j <
    indptr[s * rows + o + 1]; `group`: tiles of 8 vectors a task runs every segment over."""

    indptr: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    count: int
    group: int


def conv_call(src: np.ndarray, offsets: np.ndarray, indptr: np.ndarray, values: np.ndarray,
              bias: np.ndarray, positions: np.ndarray, width: int, block: int, threads: int,
              out: np.ndarray, out_stride: int, relu: bool, residual: tuple[int, int] | None = None,
              segments: Segments | None = None) -> Callable[[], None]:
    """The kernel of _kernels.cpp bound to these arrays, `residual` given as (address, row
    stride in floats) or None. Output row o's vectors of `width` (8 or 16) floats start at
    out[o * out_stride + q] for q in `positions` (out is 1-D: a layer's own buffer, or the next
    layer's input planes from their first interior pixel on). The caller keeps the arrays
    alive. `segments`, if given, stands in for (`offsets`, `indptr`, `values`)."""
    if segments is not None:
        offsets, values = segments.offsets, segments.values
        if segments.indptr.dtype != np.int64 or not segments.indptr.flags.c_contiguous or \
                len(segments.indptr) != segments.count * (len(indptr) - 1) + 1 or \
                segments.indptr[-1] != len(offsets) or len(values) != len(offsets):
            raise ValueError("the sparse kernel's segments do not match the layer")
    arrays = (src, offsets, indptr, values, bias, positions, out)
    if any(not a.flags.c_contiguous for a in arrays) or out.dtype != np.float32 or \
            src.dtype != np.float32 or offsets.dtype != np.int32 or indptr.dtype != np.int64 \
            or positions.dtype != np.int32:
        raise TypeError("the sparse kernel takes C-contiguous float32 / int64 / int32 arrays")
    rows = len(indptr) - 1
    if width not in (8, 16) or len(positions) == 0 or \
            (rows - 1) * out_stride + positions.max() + width > out.size or \
            offsets.max(initial=0) + positions.max() + width > src.size:
        raise ValueError("the sparse kernel would read or write past its buffers")
    res, res_stride = residual or (None, 0)
    args = ConvArgs(*(a.ctypes.data for a in arrays[:6]), len(positions), block, rows, threads,
                    int(relu), out.ctypes.data, out_stride, res, res_stride, width,
                    *((segments.count, segments.indptr.ctypes.data, segments.group)
                      if segments is not None else (0, None, 0)))
    call = functools.partial(_LIB.dnr_sparse_conv, ctypes.addressof(args))
    call.struct = (args, segments)  # the struct (and the segments) live as long as the call
    return call


def _address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def _check_chwn(*views: np.ndarray) -> None:
    for x in views:
        if x.dtype != np.float32 or x.ndim != 4 or x.strides[2:] != (x.shape[3] * 4, 4) or \
                x.strides[0] % 4 or x.strides[1] % 4:
            raise ValueError("the pooling and split kernels take CHWN float32 views whose "
                             "(width, batch) are contiguous")


def max_pool_call(x: np.ndarray, size: int, out: np.ndarray) -> Callable[[], None]:
    """out (C, H // size, W // size, N) = the max over size x size windows of x (C, H, W, N),
    bound once: both are CHWN views with any channel and row strides. The caller keeps x and
    out alive."""
    _check_chwn(x, out)
    chans, out_h, out_w, batch = out.shape
    if x.shape[0] != chans or x.shape[3] != batch or x.shape[1] < out_h * size or \
            x.shape[2] < out_w * size:
        raise ValueError(f"max_pool: {x.shape} does not pool to {out.shape}")
    return functools.partial(_LIB.dnr_max_pool, _address(x), chans, x.strides[0] // 4,
                             x.strides[1] // 4, out_h, out_w, batch, size, _address(out),
                             out.strides[0] // 4, out.strides[1] // 4)


def global_avg_pool_call(x: np.ndarray, out: np.ndarray) -> Callable[[], None]:
    """out (C, N) C-contiguous = the mean of the CHWN view x over H and W, bound once."""
    _check_chwn(x)
    chans, height, width, batch = x.shape
    if out.shape != (chans, batch) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"global_avg_pool: {x.shape} does not pool to {out.shape}")
    return functools.partial(_LIB.dnr_global_avg_pool, _address(x), chans, x.strides[0] // 4,
                             x.strides[1] // 4, height, width, batch, _address(out))


def split_phases(x: np.ndarray, stride: int, pad: int, used: np.ndarray,
                 planes: np.ndarray) -> None:
    """kernels.split_phases in C++: x (C, H, W, N) CHWN float32 with (width, batch)
    contiguous into planes (stride**2, C, hq, wq, N), C-contiguous; `used` is uint8 or bool."""
    _check_chwn(x)
    chans, height, width, batch = x.shape
    _, _, hq, wq, _ = planes.shape
    if not planes.flags.c_contiguous or planes.shape[1] != chans or \
            planes.shape[4] != batch or used.dtype.itemsize != 1 or not used.flags.c_contiguous:
        raise ValueError("split_phases takes C-contiguous planes of x's channels and batch")
    _LIB.dnr_split_phases(_address(x), chans, x.strides[0] // 4,
                          x.strides[1] // 4, height, width, batch, stride, pad,
                          used.ctypes.data, planes.ctypes.data, hq, wq)


def wide_vectors() -> bool:
    """Whether the kernel can take 16-float vectors (AVX-512) on this CPU."""
    return _LIB is not None and bool(_LIB.dnr_sparse_avx512())


class WinoIn(ctypes.Structure):
    """_winograd.cpp's WinoIn."""

    _fields_ = [("src", ctypes.c_void_p)] + \
        [(name, ctypes.c_int64) for name in ("chans", "chan_stride", "row_stride", "tiles_w",
                                              "tile0", "tiles", "batch", "threads")] + \
        [("v", ctypes.c_void_p), ("v_stride", ctypes.c_int64), ("path", ctypes.c_int64)]


class WinoOut(ctypes.Structure):
    """_winograd.cpp's WinoOut."""

    _fields_ = [("m", ctypes.c_void_p)] + \
        [(name, ctypes.c_int64) for name in ("chans", "tiles_w", "tile0", "tiles", "batch",
                                              "threads")] + \
        [("bias", ctypes.c_void_p), ("relu", ctypes.c_int64), ("out", ctypes.c_void_p),
         ("chan_stride", ctypes.c_int64), ("row_stride", ctypes.c_int64),
         ("res", ctypes.c_void_p), ("res_chan_stride", ctypes.c_int64),
         ("res_row_stride", ctypes.c_int64), ("m_stride", ctypes.c_int64),
         ("path", ctypes.c_int64)]


WINOGRAD_PATHS = {"portable": 1, "avx2": 2, "avx512": 3}  # _winograd.cpp's Path


def winograd_available() -> bool:
    """Whether the compiled Winograd transforms are present."""
    return _LIB is not None and hasattr(_LIB, "dnr_winograd_input")


def winograd_paths() -> list[str]:
    """The transforms' code paths this CPU runs, slowest first (tests run each)."""
    if not winograd_available():
        return []
    return [name for name, code in WINOGRAD_PATHS.items() if _LIB.dnr_winograd_has_path(code)]


def _winograd_path(path: str | None) -> int:
    """The code of `path`, or of the fastest this CPU runs when None."""
    paths = winograd_paths()
    if path is None:
        return WINOGRAD_PATHS[paths[-1]]
    if path not in paths:
        raise ValueError(f"winograd: this CPU does not run the {path!r} path (runs {paths})")
    return WINOGRAD_PATHS[path]


def _slices_contiguous(x: np.ndarray) -> bool:
    """Whether each x[k] of a 3-D array is C-contiguous (x itself may skip floats between)."""
    return x.ndim == 3 and x.strides[2] == 4 and x.strides[1] == 4 * x.shape[2] and \
        x.strides[0] >= 4 * x.shape[1] * x.shape[2] and x.strides[0] % 4 == 0


def _bound(function, args: ctypes.Structure) -> Callable[[], None]:
    call = functools.partial(function, ctypes.addressof(args))
    call.struct = args  # the struct lives as long as the call
    return call


def winograd_input_call(planes: np.ndarray, tiles_w: int, tiles: range, v: np.ndarray,
                        threads: int, path: str | None = None) -> Callable[[], None]:
    """The input transform of `tiles` (row-major, `tiles_w` a row) of `planes` (chans, hq, wq,
    batch), C-contiguous and zero-bordered, into V (36, chans, len(tiles) * batch), each V[k]
    C-contiguous. `path`: one of `winograd_paths()`, the fastest when None."""
    chans, hq, wq, batch = planes.shape
    last = tiles.stop - 1
    if planes.dtype != np.float32 or v.dtype != np.float32 or \
            not planes.flags.c_contiguous or not _slices_contiguous(v) or \
            v.shape != (36, chans, len(tiles) * batch) or not len(tiles) or tiles.start < 0 or \
            hq < 4 * (last // tiles_w) + 6 or wq < 4 * tiles_w + 2:
        raise ValueError("winograd_input: planes and V do not match")
    return _bound(_LIB.dnr_winograd_input,
                  WinoIn(planes.ctypes.data, chans, hq * wq * batch, wq * batch, tiles_w,
                         tiles.start, len(tiles), batch, threads, v.ctypes.data,
                         v.strides[0] // 4, _winograd_path(path)))


def winograd_output_call(m: np.ndarray, tiles_w: int, tiles: range, batch: int,
                         bias: np.ndarray, relu: bool, out: np.ndarray, out_stride: int,
                         out_row: int, residual: tuple[int, int, int] | None,
                         threads: int, path: str | None = None) -> Callable[[], None]:
    """The output transform of M (36, O, len(tiles) * batch) into `out` (1-D float32; channel
    o's pixel (i, j) at o * out_stride + i * out_row + j * batch), with bias, the residual
    (address, channel stride, row stride in floats) or None, and ReLU. `path`: one of
    `winograd_paths()`, the fastest when None."""
    chans = m.shape[1]
    last = tiles.stop - 1
    end = (chans - 1) * out_stride + (4 * (last // tiles_w) + 3) * out_row + 4 * tiles_w * batch
    if m.dtype != np.float32 or not _slices_contiguous(m) or out.dtype != np.float32 or \
            not out.flags.c_contiguous or bias.dtype != np.float32 or \
            not bias.flags.c_contiguous or bias.shape != (chans,) or not len(tiles) or \
            tiles.start < 0 or m.shape != (36, chans, len(tiles) * batch) or end > out.size:
        raise ValueError("winograd_output: M, bias and the output do not match")
    res, res_chan, res_row = residual or (None, 0, 0)
    return _bound(_LIB.dnr_winograd_output,
                  WinoOut(m.ctypes.data, chans, tiles_w, tiles.start, len(tiles), batch, threads,
                          bias.ctypes.data, int(relu), out.ctypes.data, out_stride, out_row,
                          res, res_chan, res_row, m.strides[0] // 4, _winograd_path(path)))


class WinoGemms(ctypes.Structure):
    """_winograd.cpp's WinoGemms."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("sgemm", "w", "v", "m")] + \
        [(name, ctypes.c_int64) for name in ("rows", "inner", "cols", "v_stride", "m_stride",
                                              "threads")]


@functools.cache
def blas_sgemm() -> int | None:
    """The address of cblas_sgemm with 64-bit integers in the OpenBLAS numpy loaded (pip's
    numpy bundles one), or None: another BLAS, or one with 32-bit integers, is left to
    numpy's matmul."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for info in threadpool_info():
        if info.get("internal_api") != "openblas":
            continue
        try:
            lib = ctypes.CDLL(info["filepath"])
        except OSError:
            continue
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):
            if hasattr(lib, name):
                return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    return None


def winograd_gemms_call(w: np.ndarray, v: np.ndarray, m: np.ndarray,
                        threads: int) -> Callable[[], None] | None:
    """M[k] = W[k] @ V[k] for the 36 slices, M's rows shared among `threads` threads, each
    thread's rows of a slice one call of the loaded BLAS; None where there is no such BLAS
    (numpy's matmul then)."""
    sgemm = blas_sgemm() if _LIB is not None and hasattr(_LIB, "dnr_winograd_gemms") else None
    if sgemm is None:
        return None
    _, rows, inner = w.shape
    cols = v.shape[2]
    if w.dtype != np.float32 or not w.flags.c_contiguous or v.dtype != np.float32 or \
            m.dtype != np.float32 or not _slices_contiguous(v) or \
            not _slices_contiguous(m) or w.shape[0] != 36 or v.shape != (36, inner, cols) or \
            m.shape != (36, rows, cols):
        raise ValueError("winograd_gemms: W, V and M do not match")
    return _bound(_LIB.dnr_winograd_gemms,
                  WinoGemms(sgemm, w.ctypes.data, v.ctypes.data, m.ctypes.data, rows, inner,
                            cols, v.strides[0] // 4, m.strides[0] // 4, threads))


available = _LIB is not None
