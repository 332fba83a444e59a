"""Winograd F(4x4, 3x3) for the 3x3 stride-1 layers DNR keeps dense enough (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", CVPR 2016).

Why: DNR regrows weights where the loss needs them, so the early, MAC-heavy 3x3 layers of
VGG16 and ResNet-18 end 30-47% dense at 20x. The sparse kernel then does density x 9
multiply-adds per output pixel at about half this CPU's FMA peak (load-bound, decision page
2026-12-05); Winograd does 36 / 16 = 2.25 per pixel on the dense weights, as 36 GEMMs that
numpy's BLAS runs near its peak. The transforms are `_winograd.cpp` (through `native.py`).

Rounding: the transforms scale inputs by up to 5 and outputs by up to 8, so a layer's float32
error grows from ~1e-7 to ~1e-6 of its outputs' size; a whole network stays well inside the
sparse runtime's 1e-4 parity limit against ONNX Runtime (tests/test_runtime_winograd.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numpy as np

from dnr_deploy.runtime.sparse import native

# GEMM columns (tiles x images) a block: measured with (36, 64, 64) weights, 1 thread, BLAS ran
# at 55 GMAC/s on 64 columns and 32 on 512 (V and M of a block then outgrow L2)
BLOCK_COLUMNS = 64
TILE = 4  # output pixels a tile side: F(4x4, 3x3) reads 6 x 6 input pixels a tile

# G (6 x 3): a 3x3 kernel g becomes the 6 x 6 transformed kernel G g G^T
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)


def eligible(shape: tuple[int, int, int, int], stride: int, pads: tuple[int, ...],
             dilation: int, groups: int) -> bool:
    """Whether a conv of weight shape (O, C, kh, kw) can run as Winograd: 3x3, stride 1,
    padding 1 on every side, no dilation or groups, and the compiled transforms present."""
    return native.winograd_available() and shape[2:] == (3, 3) and stride == 1 and \
        tuple(pads) == (1, 1, 1, 1) and dilation == 1 and groups == 1


def pays(density: float, in_chans: int, height: int, width: int, single: bool = False) -> bool:
    """Whether Winograd beats the sparse kernel on a layer of this density, input channels
    and output size. Read off benchmarks/winograd_threshold.py (a chunk of 8 images, 1 thread;
    benchmarks/results/winograd_threshold.json, two runs): with 16 tiles an image or more
    (16x16 outputs) and 64-128 channels it was 0.98-1.4x as fast at density 0.25, 1.3-1.6x at
    0.3 and 1.7-2.0x at 0.4; with 16 channels from 0.5; with 4 tiles (8x8) from 0.5; at 4x4
    (one tile an image: the GEMMs stream 36 x O x C weights for 8 columns) and with 3 input
    channels (a first layer) never, up to density 0.8.
    `single`: a call on one image, whose transforms take runs of tiles as vectors
    (`--batch 1`, benchmarks/results/winograd_threshold_single.json): with 16 tiles or more
    and 64-128 channels 1.24-1.33x as fast at density 0.2 and 1.8x at 0.3; with 16 channels
    and at 8x8 from 0.4-0.5. In VGG16 and ResNet-18 (DNR masks) it took the whole call from
    2.83 to 2.09 ms and from 5.99 to 4.14 ms (decisions/2026-12-06-deepsparse-layer-by-layer.md)."""
    tiles = (height // TILE) * (width // TILE)
    if in_chans < 8 or tiles < 4:
        return False
    if single:
        return density >= (0.2 if tiles >= 16 and in_chans >= 32 else 0.45)
    return density >= (0.28 if tiles >= 16 and in_chans >= 32 else 0.5)


def fits(height: int, width: int) -> bool:
    """Whether outputs of this size are whole 4 x 4 tiles (else the layer stays sparse: a
    partial tile would read past the input planes)."""
    return height % TILE == 0 and width % TILE == 0


def transformed_weights(weight: np.ndarray) -> np.ndarray:
    """(36, O, C) float32: each 3x3 kernel as G g G^T, flattened row-major (the GEMMs' left
    operands). Computed in float64 so the only float32 rounding is the stored result."""
    u = np.einsum("ai,ocij,bj->aboc", _G, weight.astype(np.float64), _G)
    return np.ascontiguousarray(u.reshape(36, *weight.shape[:2]), dtype=np.float32)


# Per thread, the scratch buffers the layers' V and M live in ("v", "m" -> buffer): one pair
# shared by every layer a thread runs, so they stay in L3 from layer to layer (a pair per
# layer, 66 MB on ResNet-18 at 8 images, made each transform 3-4x slower than on warm buffers).
_SCRATCH = threading.local()


def _stack(name: str, rows: int, columns: int) -> np.ndarray:
    """A (36, rows, columns) float32 view of this thread's scratch buffer `name`, its slices
    64 bytes past a multiple of 4 KiB apart, never on one: a transform reads or writes all 36
    slices at once, and 36 streams 4 KiB apart share one set of the 8-way L1 cache. A larger
    request replaces the buffer; calls bound to the old one keep it alive."""
    size = rows * columns
    stride = -(-size // 1024) * 1024 + 16 if size >= 1024 else size
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    if buffers.get(name) is None or buffers[name].size < 36 * stride:
        buffers[name] = np.empty(36 * stride, np.float32)
    return np.lib.stride_tricks.as_strided(buffers[name], (36, rows, columns),
                                           (stride * 4, columns * 4, 4))


def bind(weights: np.ndarray, bias: np.ndarray, planes: np.ndarray, height: int, width: int,
         out: np.ndarray, out_stride: int, out_row: int, threads: int, relu: bool,
         residual: tuple[int, int, int] | None = None, path: str | None = None
         ) -> Callable[[], None]:
    """One layer call bound to its buffers: `planes` (chans, hq, wq, batch) are the
    zero-bordered input, pixel (i, j) of output channel o goes to out[o * out_stride + i *
    out_row + j * batch] (`out` 1-D, as the sparse kernel's), `residual` is (address, channel
    stride, row stride) in floats or None; `path` forces a code path of the transforms (tests).
    The caller keeps the arrays alive."""
    chans, hq, wq, batch = planes.shape
    out_chans = weights.shape[1]
    tiles_h, tiles_w = height // TILE, width // TILE
    if not fits(height, width) or hq < height + 2 or wq < width + 2 or \
            weights.shape != (36, out_chans, chans) or bias.shape != (out_chans,):
        raise ValueError("winograd: buffers do not match the layer")
    if (out_chans - 1) * out_stride + (height - 1) * out_row + width * batch > out.size:
        raise ValueError("winograd: the output buffer is too small")
    # tiles in blocks of about BLOCK_COLUMNS GEMM columns: V and M of a block stay in L2
    per_block = max(1, BLOCK_COLUMNS // batch)
    blocks = [range(t, min(t + per_block, tiles_h * tiles_w))
              for t in range(0, tiles_h * tiles_w, per_block)]
    steps = []
    for tiles in blocks:  # the last block may be shorter: its own (36, rows, columns) views
        v = _stack("v", chans, len(tiles) * batch)
        m = _stack("m", out_chans, len(tiles) * batch)
        # on threads, the GEMMs shared among them as the transforms are (one BLAS thread each)
        gemms = native.winograd_gemms_call(weights, v, m, threads) if threads > 1 else None
        steps.append((native.winograd_input_call(planes, tiles_w, tiles, v, threads, path),
                      gemms or functools.partial(np.matmul, weights, v, out=m),
                      native.winograd_output_call(m, tiles_w, tiles, batch, bias, relu, out,
                                                  out_stride, out_row, residual, threads,
                                                  path)))

    def run() -> None:
        for transform_in, gemms, transform_out in steps:
            transform_in()
            gemms()
            transform_out()

    run.keep = (steps, weights, bias, planes, out)  # alive as long as the call
    return run
