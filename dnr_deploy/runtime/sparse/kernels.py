"""Numba kernels of the sparse runtime: direct sparse convolution, sparse linear, dense fallback.

Activations live as (C, H, W, N) float32 arrays ("CHWN"): batch innermost, then width, so the
plane an output pixel reads through one weight is a contiguous run of memory. A convolution
pads its input and, for stride s > 1, splits it into s*s polyphase planes (rows and columns of
one residue mod s), after which every tap (c, kh, kw) is a constant shift into one plane:

    out[o, h, w', n] += value * plane[phase(kh, kw), c, h + kh // s, w' + kw // s, n]

for every h < Ho and w' < Wq (the plane's width, not the output's): Park et al., ICLR 2017,
"Faster CNNs with Direct Sparse Convolutions", section 3. Running w' across the whole plane
width makes the loop over (h, w', n) one contiguous stretch of Ho*Wq*N floats per nonzero
weight, one vectorised multiply-add; the Wq - Wo columns past the output's width are computed
and thrown away (w' + kw // s stays inside the row, so they never leak into valid pixels).
The stretch is cut in tiles so the output tile stays in L1 while a row's nonzeros stream past.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

# Output floats per tile: 2 KiB of L1 for the accumulator; the input tiles a row reads
# (nonzeros x 2 KiB at most) stream from L2.
TILE = 512

_JIT = dict(nogil=True, cache=True, fastmath={"contract"})  # contract: FMA, no reassociation


@numba.njit(parallel=True, **_JIT)
def sparse_conv(src, plane, wq, batch, indptr, phase_chan, drow, dcol, values, bias, relu,
                out):
    """out[o, :] = bias[o] + sum over row o's nonzeros of value * src[shifted stretch].

    Args: src is the 1-D buffer of padded (polyphase) planes, each `plane` floats; a nonzero j
    reads from plane phase_chan[j], shifted by drow[j] rows of `wq` * `batch` floats and
    dcol[j] columns of `batch` floats. `out` is (O, L) with L = Ho * wq * batch.
    """
    rows, length = out.shape
    tiles = (length + TILE - 1) // TILE
    for task in prange(rows * tiles):
        tile, o = task // rows, task % rows
        start = tile * TILE
        stop = min(length, start + TILE)
        size = stop - start
        acc = out[o, start:stop]
        acc[:] = bias[o]
        for j in range(indptr[o], indptr[o + 1]):
            value = values[j]
            base = phase_chan[j] * plane + (drow[j] * wq + dcol[j]) * batch + start
            seg = src[base:base + size]  # a slice: indices known >= 0, so the loop vectorises
            for i in range(size):
                acc[i] += value * seg[i]
        if relu:
            for i in range(size):
                if acc[i] < 0.0:
                    acc[i] = 0.0


@numba.njit(**_JIT)  # a copy: memory-bound, and numba's thread launch costs more
def gather_columns(src, plane, wq, batch, phase_chan, drow, dcol, length, cols):
    """im2col for the dense fallback: row k of `cols` is tap k's shifted stretch of `src`."""
    for k in range(cols.shape[0]):
        base = phase_chan[k] * plane + (drow[k] * wq + dcol[k]) * batch
        cols[k, :] = src[base:base + length]


@numba.njit(**_JIT)  # a classifier layer: too small to pay for starting threads
def sparse_linear(x, indptr, indices, values, bias, out):
    """out (O, N) = W x + bias with W in CSR and x (F, N): batch contiguous."""
    rows, batch = out.shape
    for o in range(rows):
        acc = out[o]
        acc[:] = bias[o]
        for j in range(indptr[o], indptr[o + 1]):
            value = values[j]
            row = x[indices[j]]
            for n in range(batch):
                acc[n] += value * row[n]


@numba.njit(**_JIT)
def max_pool(x, size, out):
    """out (C, H // size, W // size, N) = the max over size x size windows of x (C, H, W, N)."""
    chans, out_h, out_w, batch = out.shape
    for c in range(chans):
        for h in range(out_h):
            for w in range(out_w):
                for n in range(batch):
                    out[c, h, w, n] = x[c, h * size, w * size, n]
                for dh in range(size):
                    for dw in range(size):
                        for n in range(batch):
                            out[c, h, w, n] = max(out[c, h, w, n],
                                                  x[c, h * size + dh, w * size + dw, n])


@numba.njit(**_JIT)
def global_avg_pool(x, out):
    """out (C, N) = the mean of x (C, H, W, N) over H and W."""
    chans, height, width, batch = x.shape
    scale = np.float32(1.0 / (height * width))
    for c in range(chans):
        for n in range(batch):
            out[c, n] = 0.0
        for h in range(height):
            for w in range(width):
                for n in range(batch):
                    out[c, n] += x[c, h, w, n]
        for n in range(batch):
            out[c, n] *= scale


@numba.njit(**_JIT)
def split_phases(x, stride, pad, used, planes):
    """planes[a * stride + b, c, i, j] = x[c, stride*i + a - pad, stride*j + b - pad] for the
    phases with used[a * stride + b]; cells falling in the padding are left as they are (zero).
    """
    chans, height, width, batch = x.shape
    _, _, hq, wq, _ = planes.shape
    for a in range(stride):
        for b in range(stride):
            phase = a * stride + b
            if not used[phase]:
                continue
            for c in range(chans):
                for i in range(hq):
                    h = stride * i + a - pad
                    if h < 0 or h >= height:
                        continue
                    for j in range(wq):
                        w = stride * j + b - pad
                        if w < 0 or w >= width:
                            continue
                        for n in range(batch):
                            planes[phase, c, i, j, n] = x[c, h, w, n]
