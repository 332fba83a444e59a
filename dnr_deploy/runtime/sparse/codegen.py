"""Machine code generated per layer at load time (_codegen.cpp), loaded with ctypes.

The ahead-of-time kernel reads an offset and a value for every nonzero; a layer's own code has
its mask compiled in and keeps 24 output channels in registers, so each input vector it loads
serves every channel with a weight there. It runs where it pays (`SparseConv` decides by
density) on AVX-512 CPUs; elsewhere, or when the code cannot be made (a displacement past 32
bits, no executable pages), the kernel runs as before.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

from dnr_deploy.runtime.sparse import native

BLOCK_ROWS = 24  # output channels a block keeps in registers (benchmarks/generated_code.py)
# multiply-adds of a block's code that run over all of a call's positions before the next
# ones: about 7 KiB of code, so that it stays in the instruction cache
SEGMENT = 1024
MAX_SPANS = 4096  # segments a block at most when cut at whole input planes (_codegen.cpp)
# multiply-adds between prefetches of a line of the next segment's code (0: none). Against none,
# in turns (probes, DNR masks, batch 16, 1 thread): every 4, 8 and 12 all ran 1-5% faster on
# VGG16 and ResNet-18, near the noise (benchmarks/codegen_ab.py keeps the comparison); 8
# covers about the next segment's code
# (docs/decisions/2026-12-06-strided-reads-in-place.md)
PREFETCH = 8

_LIB = native._LIB if native.available and hasattr(native._LIB, "dnr_codegen_compile") \
    else None
if _LIB is not None:
    _LIB.dnr_codegen_available.restype = ctypes.c_int
    _LIB.dnr_codegen_compile.argtypes = [ctypes.c_void_p]
    _LIB.dnr_codegen_compile.restype = ctypes.c_void_p
    _LIB.dnr_codegen_size.argtypes = [ctypes.c_void_p]
    _LIB.dnr_codegen_size.restype = ctypes.c_int64
    _LIB.dnr_codegen_pages.argtypes = [ctypes.c_void_p]
    _LIB.dnr_codegen_pages.restype = ctypes.c_void_p
    _LIB.dnr_codegen_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _LIB.dnr_codegen_copy.restype = None
    _LIB.dnr_codegen_free.argtypes = [ctypes.c_void_p]
    _LIB.dnr_codegen_free.restype = None
    _LIB.dnr_codegen_conv.argtypes = [ctypes.c_void_p]
    _LIB.dnr_codegen_conv.restype = None


def available() -> bool:
    """Whether this CPU runs generated code (AVX-512) and the library has the emitter."""
    return _LIB is not None and bool(_LIB.dnr_codegen_available())


class _Spec(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int64)] + \
        [(name, ctypes.c_void_p) for name in ("indptr", "offsets", "values", "bias")] + \
        [(name, ctypes.c_int64) for name in ("block_rows", "out_stride", "relu", "segment",
                                             "span", "prefetch")]


class _Call(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("handle", "src", "out", "pos")] + \
        [("npos", ctypes.c_int64), ("res", ctypes.c_void_p)] + \
        [(name, ctypes.c_int64) for name in ("res_stride", "threads", "chunk")] + \
        [("out_pos", ctypes.c_void_p)]


class LayerCode:
    """One layer's generated code for one input geometry (its offsets) and output stride;
    the pages are unmapped when it is collected."""

    def __init__(self, indptr: np.ndarray, offsets: np.ndarray, values: np.ndarray,
                 bias: np.ndarray, out_stride: int, relu: bool,
                 block_rows: int = BLOCK_ROWS, segment: int = SEGMENT, span: int = 0,
                 prefetch: int = PREFETCH) -> None:
        """`span` > 0: segments cut at input offsets that are multiples of it (whole input
        channels, when it is a multiple of their plane) instead of every `segment`
        multiply-adds, so that one-thread calls run each segment of every block in turn."""
        rows = len(indptr) - 1
        arrays = (np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(offsets, np.int32),
                  np.ascontiguousarray(values, np.float32), np.ascontiguousarray(bias, np.float32))
        indptr, offsets, values, bias = arrays
        if rows < 1 or indptr[0] != 0 or indptr[-1] != len(offsets) or \
                len(values) != len(offsets) or len(bias) != rows or np.any(np.diff(indptr) < 0):
            raise ValueError("generated code: the CSR arrays do not match")
        spec = _Spec(rows, *(a.ctypes.data for a in arrays), block_rows, out_stride, int(relu),
                     segment, span, prefetch)
        self.handle = _LIB.dnr_codegen_compile(ctypes.addressof(spec))
        if not self.handle:
            raise ValueError("generated code: this layer's offsets or strides do not fit 32-bit "
                             "displacements, its span cuts more than 4096 segments, or no "
                             "executable pages")
        self.rows, self.out_stride, self.reach = rows, out_stride, int(offsets.max(initial=0))

    @property
    def size(self) -> int:
        """Bytes of code."""
        return int(_LIB.dnr_codegen_size(self.handle))

    @property
    def address(self) -> int:
        """Where the code lies (its pages are read + execute, never writable)."""
        return int(_LIB.dnr_codegen_pages(self.handle))

    def code(self) -> bytes:
        """A copy of the code (the tests disassemble it)."""
        out = np.empty(self.size, np.uint8)
        _LIB.dnr_codegen_copy(self.handle, out.ctypes.data)
        return out.tobytes()

    def __del__(self) -> None:
        if getattr(self, "handle", None) and _LIB is not None:
            _LIB.dnr_codegen_free(self.handle)
            self.handle = None

    def call(self, src: np.ndarray, positions: np.ndarray, out: np.ndarray, threads: int,
             residual: tuple[int, int] | None = None, chunk: int = 64,
             out_positions: np.ndarray | None = None) -> Callable[[], None]:
        """The code bound to these arrays, as `native.conv_call` with 16-float vectors: output
        channel o's vector at position q is out[o * out_stride + q], `residual` given as
        (address, channel stride in floats) or None. `out_positions`, one per position, puts
        them elsewhere (a strided conv reads its input at positions s pixels apart and writes
        its output's pixels side by side). The caller keeps the arrays alive."""
        out_positions = positions if out_positions is None else out_positions
        if src.dtype != np.float32 or out.dtype != np.float32 or \
                positions.dtype != np.int32 or out_positions.dtype != np.int32 or \
                not all(a.flags.c_contiguous for a in (src, out, positions, out_positions)):
            raise TypeError("generated code takes C-contiguous float32 arrays, int32 positions")
        if len(positions) == 0 or len(out_positions) != len(positions) or \
                min(positions.min(), out_positions.min()) < 0 or \
                (self.rows - 1) * self.out_stride + out_positions.max() + 16 > out.size or \
                self.reach + positions.max() + 16 > src.size:
            raise ValueError("generated code would read or write past its buffers")
        res, res_stride = residual or (None, 0)
        args = _Call(self.handle, src.ctypes.data, out.ctypes.data, positions.ctypes.data,
                     len(positions), res, res_stride, threads, chunk, out_positions.ctypes.data)
        run = functools.partial(_LIB.dnr_codegen_conv, ctypes.addressof(args))
        run.keep = (args, self, src, positions, out_positions, out)  # alive with the call
        return run
