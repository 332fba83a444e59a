"""Layers of the sparse runtime: a convolution or linear layer with batch norm folded in,
stored as CSR and run by the compiled kernel (`native.py`, else numba), or densely above a
density threshold."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from dnr_deploy.runtime.sparse import codegen, native, winograd
from dnr_deploy.runtime.sparse.arena import BufferArena, Life

# Above this fraction of nonzero weights a layer runs as im2col + BLAS instead of the sparse
# kernel. Measured with benchmarks/sparse_threshold.py (3x3 convs of VGG16's sizes, batch 4,
# 1 thread): the sparse kernel is faster up to 0.7-0.8 at 8x8 to 32x32 and at every density
# at 4x4, where im2col costs most; so the fallback is for layers DNR keeps nearly dense.
DENSE_THRESHOLD = 0.8
# ... and only when it holds this many weights: a tiny dense layer (the default net's first conv,
# 288 weights, or its 10x128 classifier, both kept dense by DNR) runs faster in the sparse
# kernel than through an im2col gather, a BLAS call and the BLAS thread limit around each call
# (~14 us of threadpoolctl alone, a quarter of that net's ONNX Runtime latency).
DENSE_MIN_WEIGHTS = 4096
# A layer call splits over OpenMP threads only from this many multiply-adds (nonzeros x output
# floats, garbage columns included): below it, waking a second thread costs more than it saves.
# Measured at 2 threads, 5% density (benchmarks/sparse_runtime.py --turn 5): lowering it from
# 4M to 200k took VGG16 at batch 1 from 1.29 to 0.64 ms and ResNet-18 from 1.44 to 1.04 ms.
# The published grid ran with 100k; 100k against 200k was not compared.
PARALLEL_MIN_MACS = 100_000
# From this density a layer's 16-float calls run generated code (codegen.py) where the CPU has
# AVX-512: below it, the kernel's index per nonzero costs less than loading inputs that few of
# a block's 24 channels use.
CODEGEN_MIN_DENSITY = 0.03
# The kernel cuts a layer's input channels into segments holding about this many nonzeros of
# each output channel (a power of 2 channels, all of them at most) and runs each segment over
# SEGMENT_GROUP tiles of positions at a time, for every output channel, before the next: the
# segment's input then stays in cache while every channel reads it. Probe (AVX2, 3x3 layers at
# batch 16, 1 thread, against whole channels): 8 to 128 channels a segment and 1 to 16 tiles,
# best at about 30 nonzeros (64 channels at density 0.05: 1.06-1.44x; 32 at 0.15: 1.51x; 128
# at 0.02: 1.46x), the group mattering little from 4 tiles. Only for 8-float vectors: AVX-512's
# kernel (16) was not measured with them
SEGMENT_NONZEROS = 30
SEGMENT_GROUP = 8


def _pixels_fill_vectors(g: Geometry) -> bool:
    """Whether each output row's pixels are whole AVX2 vectors of 8 floats (then the kernel
    computes pixels only, no garbage columns)."""
    return g.wo * g.batch % 8 == 0


def _vector_width(g: Geometry) -> int:
    """Floats a vector of the kernel covers in a call of this geometry: 16 (AVX-512) on a
    chunk of 8 or 16 images where a row's pixels fill them, else 8. Measured at batch 16, 5%
    density, 1 thread, against 8-float vectors on chunks of 4: VGG16 8.5-9.0 ms instead of
    11.6-13.6, ResNet-18 16.5-17.4 instead of 20.0-23.3 (benchmarks/sparse_runtime.py --turn
    5); on fewer images (batch 1) the wide loads straddle cache lines and gain nothing."""
    return 16 if native.wide_vectors() and g.batch % 8 == 0 and g.wo * g.batch % 16 == 0 else 8


def _faster(first: dict, second: dict, rounds: int = 3) -> dict:
    """The job whose call took less time, best of `rounds` calls each in turns (a layer's
    first call of a shape, where Winograd and generated code both pay: which wins depends on
    the layer's density, size and the CPU, docs/decisions/2026-12-06-generated-code.md)."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, job in enumerate((first, second)):
            start = time.perf_counter()
            job["run"]()
            best[i] = min(best[i], time.perf_counter() - start)
    return first if best[0] <= best[1] else second


class UnsupportedLayerError(ValueError):
    """A layer or setting the sparse runtime has no kernel for (named, with the fix)."""


def _no_code(layer: SparseConv, relu: bool, residual: tuple[int, int] | None = None) -> None:
    """The kernel's bind for a conv that reads its input in place: the kernel cannot (it reads
    where it writes), and its generated code, made once already, could not be made again."""
    raise MemoryError(f"no executable pages for the generated code of a {layer.shape} conv")


def csr_arrays(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, column indices, values) of a 2-D matrix's nonzeros, row-major (sorted)."""
    rows, columns = np.nonzero(matrix)
    indptr = np.zeros(matrix.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=matrix.shape[0]), out=indptr[1:])
    return indptr, columns.astype(np.int64), matrix[rows, columns].astype(np.float32)


def chwn_view(x: np.ndarray) -> np.ndarray:
    """`x`, or a copy of it, as the compiled pooling and split kernels take it: float32 CHWN
    whose (width, batch) are contiguous (a numpy op's result on a size-1 axis may not be)."""
    if x.dtype == np.float32 and x.ndim == 4 and x.strides[2:] == (x.shape[3] * 4, 4) and \
            not x.strides[0] % 4 and not x.strides[1] % 4:
        return x
    return np.array(x, np.float32, order="C", copy=True)  # canonical strides on size-1 axes


def _kernels():
    """The numba kernels, imported only where the compiled library is missing or a layer runs
    densely (numba is not needed when the compiled kernel runs every sparse layer)."""
    from dnr_deploy.runtime.sparse import kernels

    return kernels


@dataclass(frozen=True)
class Geometry:
    """Where one call of a conv reads and writes: its input padded (and, for stride > 1,
    split into polyphase planes) to `hq` x `wq`, and its output as a stretch of `ho` rows of
    `out_width` columns of `batch` floats, of which the first `wo` columns are pixels and the
    rest garbage (never computed where a row's pixels fill whole vectors, else computed and
    dropped).

    A strided conv whose generated code reads its padded input in place, `stride` pixels
    apart, instead of from polyphase planes has `stride` > 1 (`SparseConv.reads_in_place`);
    its output rows are `pitch` pixels apart, and where it reads the planes of another conv
    of the same input (`SparseConv.shares`), its own padded input starts `origin` floats into
    them. Otherwise the output rows are the planes' rows."""

    ho: int
    wo: int
    hq: int
    wq: int
    batch: int
    stride: int = 1
    pitch: int = 0
    origin: int = 0

    @property
    def plane(self) -> int:
        return self.hq * self.wq * self.batch

    @property
    def offsets_key(self) -> tuple[int, ...]:
        """What a nonzero's offset in the planes depends on: the key of everything made from
        the offsets (the offsets, generated code, the kernel's segments)."""
        return self.plane, self.wq, self.batch, self.stride, self.origin

    @property
    def out_width(self) -> int:
        return self.pitch or self.wq

    @property
    def length(self) -> int:
        return self.ho * self.out_width * self.batch


class SparseConv:
    """A Conv2d (+ folded BatchNorm2d, + optional residual addition, + optional ReLU) on CHWN
    activations.

    Example: a 3x3, stride-2 conv with a nonzero at (o=0, c=5, kh=2, kw=1) reads polyphase plane
    (2 % 2, 1 % 2) = (0, 1) of channel 5, shifted by 2 // 2 = 1 row and 1 // 2 = 0 columns.

    Two links the executor sets, both of which only save copies:
    - `into`: the stride-1 conv that consumes this one's output. Where this layer computes
      pixels only (no garbage columns), the kernel writes straight into that conv's
      zero-bordered input planes, leaving their borders untouched.
    - `match`: the conv that adds this one's output as its residual (a ResNet projection
      shortcut). This conv's planes are widened to that conv's width, so both outputs are laid
      out alike and the addition happens in the consumer's epilogue.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int,
                 padding: int | tuple[int, int, int, int], relu: bool,
                 dense_threshold: float = DENSE_THRESHOLD, dilation: int = 1,
                 groups: int = 1) -> None:
        # groups: `weight` is (O, C / groups, kh, kw) and the layer runs as the block-diagonal
        # (O, C, kh, kw) conv, which the CSR stores at the cost of the groups' weights alone
        out_chans, group_chans, kh, kw = weight.shape
        in_chans = group_chans * groups
        # padding: one number, or ONNX's (top, left, bottom, right); `padding` is the top one
        # and, with stride > 1, must equal the left one (the phase split takes one offset)
        pads = (padding,) * 4 if isinstance(padding, int) else tuple(int(p) for p in padding)
        if stride > 1 and pads[0] != pads[1]:
            raise UnsupportedLayerError(f"a strided conv needs equal top and left padding; "
                                        f"got {pads}")
        self.pads, self.padding, self.dilation = pads, pads[0], dilation
        self.shape, self.stride, self.relu = (out_chans, in_chans, kh, kw), stride, relu
        self.weights = weight.size  # the dense layer's, for its MACs
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        matrix = weight.reshape(out_chans, -1)
        self.density = float(np.count_nonzero(matrix)) / matrix.size
        self.dense = groups == 1 and self.density > dense_threshold and \
            matrix.size >= DENSE_MIN_WEIGHTS
        if self.dense:  # every tap, in the (c, kh, kw) order of the weight's columns
            self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
            columns = np.arange(matrix.shape[1])
        else:
            self.indptr, columns, self.values = csr_arrays(matrix)
            if groups > 1:  # row o reads group o // (O / groups)'s channels
                rows = np.repeat(np.arange(out_chans), np.diff(self.indptr))
                columns = columns + rows // (out_chans // groups) * matrix.shape[1]
        chan, tap = np.divmod(columns, kh * kw)
        row, col = np.divmod(tap, kw)
        row, col = row * dilation, col * dilation
        phase = (row % stride) * stride + col % stride
        self.phase_chan = (phase * in_chans + chan).astype(np.int64)
        self.used_phases = np.zeros(stride * stride, np.bool_)
        self.used_phases[np.unique(phase)] = True
        self.drow = (row // stride).astype(np.int64)
        self.dcol = (col // stride).astype(np.int64)
        self.nonzeros = int(np.count_nonzero(matrix))
        # Winograd F(4x4, 3x3) where it pays (winograd.py): the shape decides here, the density
        # and output size at the first call of a size (which also makes the transformed
        # weights, after any normalization is folded in); `winograd_always` is for benchmarks
        self.winograd = not self.dense and winograd.eligible(self.shape, stride, pads,
                                                             dilation, groups)
        self.winograd_always = False
        # generated code for this layer's 16-float calls (benchmarks set it to compare)
        self.codegen = not self.dense and codegen.available() and \
            self.density >= CODEGEN_MIN_DENSITY
        # a strided conv's code may read its input unsplit, and code prefetches the code that
        # runs next (benchmarks set them to compare: benchmarks/codegen_ab.py)
        self.in_place, self.code_prefetch = True, codegen.PREFETCH
        self.written_by: object | None = None  # the step that writes into this one's planes
        # a conv reading the same input in place, with no less padding, whose planes this
        # strided one reads too (model.link_convs): a ResNet projection beside its block's
        # first conv, which then copies nothing
        self.shares: SparseConv | None = None
        self._winograd_weights: np.ndarray | None = None
        self.into: SparseConv | None = None
        self.match: SparseConv | None = None
        self.border: np.ndarray | None = None  # per input channel: what the padding holds
        # set by the model (arena.py): buffers shared with layers never live at the same time,
        # and this layer's (input planes, own output) lives in a call's steps
        self.arena: BufferArena | None = None
        self.lives: tuple[Life, Life] | None = None
        self._offsets: dict[tuple[int, ...], np.ndarray] = {}
        self._jobs: dict[tuple, dict] = {}
        self._codes: dict[tuple, codegen.LayerCode | None] = {}  # generated code, by geometry
        # the kernel runs segments of input channels (benchmarks set it to compare)
        self.segmented = True
        self._segment_cache: dict[tuple, native.Segments] = {}

    takes_threads = True  # SparseModel passes `threads` to it
    def fold_input_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Take over a (x - mean) / std before this layer: weights divided by std, the mean's
        share moved into the bias, and the padding filled with the mean instead of zero, so
        a padded pixel still normalizes to 0. Saves the normalization's pass over the input."""
        in_chans = self.shape[1]
        mean, std = (np.asarray(v, np.float64).reshape(in_chans) for v in (mean, std))
        chan = self.phase_chan % in_chans  # the input channel of every stored weight
        if self.dense:
            weights = self.matrix.astype(np.float64)
            self.matrix = np.ascontiguousarray(weights / std[chan], dtype=np.float32)
            shift = weights @ (mean / std)[chan]
        else:
            weights = self.values.astype(np.float64)
            self.values = (weights / std[chan]).astype(np.float32)
            rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
            shift = np.bincount(rows, weights * (mean / std)[chan], minlength=self.shape[0])
        self.bias = (self.bias - shift).astype(np.float32)
        self.border = mean.astype(np.float32)
        self._jobs.clear()
        self._codes.clear()
        self._segment_cache.clear()
        self._winograd_weights = None  # made again from the folded weights

    @property
    def native(self) -> bool:
        """Whether the compiled kernel runs this layer (it alone writes into other buffers)."""
        return native.available and not self.dense

    def geometry(self, shape: tuple, width: int = 0) -> Geometry:
        """The planes and stretch of a call on CHWN inputs of `shape`, its output rows at least
        `width` wide."""
        _, height, width_in, batch = shape
        kh, kw = ((k - 1) * self.dilation + 1 for k in self.shape[2:])
        s, (top, left, bottom, right) = self.stride, self.pads
        hp, wp = height + top + bottom, width_in + left + right
        ho, wo = (hp - kh) // s + 1, (wp - kw) // s + 1
        if self.reads_in_place(batch):
            return Geometry(ho=ho, wo=wo, hq=hp, wq=wp, batch=batch, stride=s,
                            pitch=max(wo, width))
        return Geometry(ho=ho, wo=wo, hq=-(-hp // s), wq=max(-(-wp // s), width), batch=batch)

    def reads_in_place(self, batch: int) -> bool:
        """Whether calls on chunks of `batch` images read a strided conv's padded input in
        place, not split into polyphase planes: where generated code runs on vectors of one
        pixel (16 images), it can read each output pixel's input `stride` pixels from the last,
        so the layer before writes straight into the planes and nothing is split. The split
        cost ResNet-18 at batch 16 about 1.3 ms of 45 (its input, just written, came from L3)."""
        # copying the input in costs as much as a split of every phase, more than a split of
        # some (a 1x1 stride-2 conv reads 1 of 4): so in place where nothing copies, or no less
        return self.stride > 1 and self.codegen and self.in_place and native.wide_vectors() \
            and batch % 16 == 0 and (self.written_by is not None or self.shares is not None or
                                     bool(self.used_phases.all()))

    def _planes_count(self, g: Geometry) -> int:
        """Planes per input channel: one, or one per polyphase phase."""
        return 1 if g.stride > 1 else self.stride ** 2

    def offsets(self, g: Geometry) -> np.ndarray:
        """Start of each nonzero's shifted stretch in the plane buffer (cached per shape)."""
        key = g.offsets_key
        if key not in self._offsets:
            if g.stride > 1:  # (channel, dilated tap) in the one padded plane of each channel
                s, chans = self.stride, self.shape[1]
                phase, chan = np.divmod(self.phase_chan, chans)
                row, col = self.drow * s + phase // s, self.dcol * s + phase % s
                offsets = g.origin + chan * g.plane + (row * g.wq + col) * g.batch
            else:
                offsets = self.phase_chan * g.plane + (self.drow * g.wq + self.dcol) * g.batch
            self._offsets[key] = np.ascontiguousarray(offsets, dtype=np.int64)
        return self._offsets[key]

    def _target(self, natural: Geometry, threads: int) -> tuple[dict | None, int]:
        """(the job of the conv whose planes this call writes into, or None; the plane width
        to use). Builds the linked conv's job (for its actual geometry) if it has none yet."""
        out_shape = (self.shape[0], natural.ho, natural.wo, natural.batch)
        # only a layer that computes no garbage columns may write into another's planes:
        # they would land on its zero borders; and only planes that are the padded input
        # (stride 1, or read in place), not polyphase planes
        if self.into is not None and _pixels_fill_vectors(natural):
            into = self.into._job(out_shape, threads)
            if into["interior"] is not None and natural.out_width <= into["geometry"].wq:
                return into, into["geometry"].wq
        if self.match is not None and self.match.stride == 1:
            # the consumer's input has our output's size if it keeps the size (3x3 pad 1,
            # 1x1 pad 0); if not, its epilogue cannot take our layout and adds it afterwards
            shape = (self.match.shape[1], natural.ho, natural.wo, natural.batch)
            return None, self.match._job(shape, threads)["geometry"].wq
        return None, 0

    def _job(self, shape: tuple, threads: int) -> dict:
        """Everything a call on inputs of `shape` needs, made once and kept per calling thread:
        zero-bordered input buffers (only their interior is ever written, so borders and slack
        stay zero), the output and its view, the kernel's arguments."""
        key = (shape, threads, threading.get_ident())
        if key in self._jobs:
            return self._jobs[key]
        chans, height, width, batch = shape
        kw = (self.shape[3] - 1) * self.dilation + 1
        s, (top, left) = self.stride, self.pads[:2]
        into, wide = self._target(self.geometry(shape), threads) if self.native else (None, 0)
        g = self.geometry(shape, wide)
        job = self._shared_planes(shape, g, threads)
        if job is not None:
            g = job["geometry"]
        else:
            # slack: the garbage columns of the last row of the last plane, and a last vector
            # of 8 floats (or the padding of the stretch to whole vectors) read past its end
            count = self._planes_count(g)
            size = count * chans * g.plane + (kw + 1) * batch + 64
            # zeroed, and shared only with planes of the same geometry: borders stay zero
            raw = self._buffer(0, ("planes", shape, s, self.pads, g), size + 16,
                               (batch, threads), zeroed=True) \
                if self.border is None else np.zeros(size + 16, np.float32)
            shift = (-(raw.ctypes.data // 4)) % 16  # aligned to 64 bytes: with 8 images a
            src = raw[shift:shift + size]  # pixel is 32 bytes, so no 16-float load of a pixel
            # pair straddles more than one cache line boundary
            planes = src[:count * chans * g.plane].reshape(count, chans, g.hq, g.wq, batch)
            if self.border is not None:
                planes[:] = self.border[None, :, None, None, None]
            job = {"src": src, "planes": planes, "geometry": g,
                   "interior": planes[0, :, top:top + height, left:left + width] if count == 1
                   else None}
        self._jobs[key] = job
        if not self.native:
            return job
        if into is not None:  # straight into the consumer's planes
            start = (self.into.pads[0] * into["geometry"].wq + self.into.pads[1]) * batch
            out, out_stride = into["src"][start:], into["geometry"].plane
            view = into["interior"]
        else:
            out, out_stride, view = None, 0, None
        if not self._runs_winograd(g):
            job = self._sparse_job(job, g, threads, out, out_stride, view)
            if g.stride > 1 and job["path"] != "generated":  # no code (no executable pages)
                self.in_place = False  # split into polyphase planes for the kernel, then
                del self._jobs[key]
                return self._job(shape, threads)
            return job
        if not (self.codegen and _vector_width(g) == 16):
            return self._winograd_job(job, g, threads, out, out_stride, view)
        # both pay: the faster on this machine, timed on the job's input and writing to
        # scratch laid out as the output (the output may be a buffer that another layer's
        # values live in now: its life starts at this layer's step, not at this first call)
        scratch = None if out is None else np.empty_like(out)
        trial = _faster(self._winograd_job(dict(job), g, threads, scratch, out_stride, view,
                                           trial=True),
                        self._sparse_job(dict(job), g, threads, scratch, out_stride, view,
                                         trial=True))
        make = self._winograd_job if trial["path"] == "winograd" else self._sparse_job
        job = make(job, g, threads, out, out_stride, view)
        self._jobs[key] = job
        return job

    def _shared_planes(self, shape: tuple, g: Geometry, threads: int) -> dict | None:
        """A job holding the planes of `shares` and this call's geometry in them, where this
        strided conv reads its input in place from them; else None."""
        if self.shares is None or g.stride == 1:
            return None
        other = self.shares._job(shape, threads)
        if other["interior"] is None or other["src"].size >= 2 ** 31:
            return None
        theirs, batch = other["geometry"], g.batch
        origin = ((self.shares.pads[0] - self.pads[0]) * theirs.wq +
                  self.shares.pads[1] - self.pads[1]) * batch
        return {key: other[key] for key in ("src", "planes", "interior")} | \
            {"geometry": replace(g, hq=theirs.hq, wq=theirs.wq, origin=origin)}

    def _buffer(self, which: int, key: tuple, size: int, signature: tuple,
                zeroed: bool) -> np.ndarray:
        """A float32 buffer of `size` floats for this layer's input planes (`which` 0) or own
        output (1): from the model's arena, if it set one, for calls of `signature` (chunk
        size, threads), else new (zeroed if asked)."""
        make = functools.partial(np.zeros if zeroed else np.empty, dtype=np.float32)
        if self.arena is None or self.lives is None:
            return make(size)
        return self.arena.take(signature, key, size, self.lives[which], make)

    def _sparse_job(self, job: dict, g: Geometry, threads: int, out: np.ndarray | None,
                    out_stride: int, view: np.ndarray | None, trial: bool = False) -> dict:
        """`job` completed for the sparse kernel, or the layer's generated code where it runs:
        its output (its own buffer, or the consumer's planes) and the bound call, taking
        `bind(relu, residual)`. A `trial` job's own output is a new buffer, not the arena's."""
        src, (chans, batch, s) = job["src"], (self.shape[1], g.batch, self.stride)
        width = _vector_width(g)
        reads = None  # where the code reads each position's input, if not at the position
        if _pixels_fill_vectors(g):  # the pixels' vectors only, row by row
            vectors = width * np.arange(g.wo * batch // width)
            positions = (np.arange(g.ho)[:, None] * g.out_width * batch +
                         vectors[None, :]).reshape(-1)
            out_length = g.length
            if g.stride > 1:  # each output pixel's input, `stride` pixels (rows) from the last
                pixel, within = np.divmod(vectors, batch)
                reads = (np.arange(g.ho)[:, None] * g.stride * g.wq * batch +
                         (pixel * g.stride * batch + within)[None, :]).reshape(-1).astype(np.int32)
        else:  # the whole stretch, garbage columns and the padding to whole vectors included
            positions = width * np.arange(-(-g.length // width))
            out_length = len(positions) * width
        positions = positions.astype(np.int32)
        reads = positions if reads is None else reads
        if out is not None:
            job["view"] = view
        else:
            out_stride = out_length
            out, job["view"] = self._own_output(g, out_length, threads, trial)
        # blocks of tiles (8 vectors of 8 or 16 floats) sized so that the input a block reads (one
        # stretch per input channel and phase) stays near 256 KiB, a quarter of L2 here
        block = max(1, 65536 // (chans * s * s) // (8 * width))
        # int32 offsets: 8 bytes a nonzero with its value instead of 12, which the deep
        # layers stream from L3 for every chunk of images
        if src.size >= 2 ** 31:
            raise UnsupportedLayerError(f"inputs of {chans} x {g.hq} x {g.wq} x {batch} are too "
                                        "large for the sparse kernel's 32-bit offsets; use "
                                        "--runtime ort")
        offsets = self.offsets(g).astype(np.int32)
        # OpenMP inside a layer only when its work pays for waking a thread: on a loaded
        # machine each parallel region can wait a scheduler slice for a late worker
        team = threads if self.nonzeros * g.length >= PARALLEL_MIN_MACS else 1
        bind = functools.partial(native.conv_call, src, offsets, self.indptr, self.values,
                                 self.bias, positions, width, block, team, out, out_stride,
                                 segments=self._segments(g, offsets) if width == 8 else None)
        if g.stride > 1:  # the kernel reads where it writes: only generated code reads apart
            bind = functools.partial(_no_code, self)
        generated = self._generated_bind(bind, g, src, offsets, reads, positions, out,
                                         out_stride, team) \
            if width == 16 and self.codegen else None
        job["path"] = "generated" if generated else "kernel"
        bind = generated or bind
        job.update(bind=bind, run=bind(self.relu), keep=(offsets, reads, positions, out),
                   residual=None)
        return job

    def _generated_bind(self, kernel_bind: Callable, g: Geometry, src: np.ndarray,
                        offsets: np.ndarray, reads: np.ndarray, positions: np.ndarray,
                        out: np.ndarray, out_stride: int, team: int) -> Callable | None:
        """`bind(relu, residual)` running this layer's generated code, or None where the code
        cannot be made (a displacement past 32 bits, no executable pages): the kernel runs
        then. The code depends on the planes' geometry, the output stride and ReLU (compiled
        in), not on the buffers: jobs of other threads with the same ones share it."""

        def code_for(relu: bool) -> codegen.LayerCode | None:
            key = (*g.offsets_key, out_stride, relu)
            if key not in self._codes:
                try:
                    self._codes[key] = codegen.LayerCode(self.indptr, offsets, self.values,
                                                         self.bias, out_stride, relu,
                                                         span=self._span(g),
                                                         prefetch=self.code_prefetch)
                except ValueError:
                    self._codes[key] = None
            return self._codes[key]

        def bind(relu: bool, residual: tuple[int, int] | None = None) -> Callable[[], None]:
            code = code_for(relu)
            if code is None:
                return kernel_bind(relu, residual)
            return code.call(src, reads, out, team, residual, out_positions=positions)

        return bind if code_for(self.relu) is not None else None

    def _span(self, g: Geometry) -> int:
        """Input floats a segment of generated code covers: whole input planes (channels, or
        channels of a polyphase plane), as many as make about `codegen.SEGMENT` multiply-adds
        of a block of `codegen.BLOCK_ROWS` channels."""
        taps = self.shape[2] * self.shape[3]
        per_plane = codegen.BLOCK_ROWS * taps * max(self.density, 1e-3)
        planes = self._planes_count(g) * self.shape[1]  # within the emitter's bound on segments
        return max(1, round(codegen.SEGMENT / per_plane), -(-planes // codegen.MAX_SPANS)) * \
            g.plane

    def _segments(self, g: Geometry, offsets: np.ndarray) -> native.Segments | None:
        """The nonzeros at `offsets` (int32, the CSR's order, for geometry `g`) cut into
        segments of input channels, about SEGMENT_NONZEROS a row each, for the kernel; None
        where one segment would hold them all (or `self.segmented` is off)."""
        in_chans, taps = self.shape[1], self.shape[2] * self.shape[3]
        per_segment = SEGMENT_NONZEROS / (taps * max(self.density, 1e-4))
        chans = min(in_chans, 1 << max(0, round(np.log2(per_segment))))  # a power of 2
        count = -(-in_chans // chans)
        if not self.segmented or count < 2:
            return None
        key = (chans, *g.offsets_key)
        if key not in self._segment_cache:
            rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
            segment = self.phase_chan % in_chans // chans
            order = np.lexsort((rows, segment))  # segment-major, then by row, then CSR order
            indptr = np.zeros(count * self.shape[0] + 1, np.int64)
            np.cumsum(np.bincount(segment * self.shape[0] + rows,
                                  minlength=count * self.shape[0]), out=indptr[1:])
            self._segment_cache[key] = native.Segments(
                indptr, np.ascontiguousarray(offsets[order]),
                np.ascontiguousarray(self.values[order]), count, SEGMENT_GROUP)
        return self._segment_cache[key]

    def _own_output(self, g: Geometry, out_length: int, threads: int,
                    trial: bool) -> tuple[np.ndarray, np.ndarray]:
        """A buffer of `out_length` floats per output channel (the arena's, but for a trial),
        and its pixels as a CHWN view (rows of `wq` columns; the garbage columns skipped)."""
        size = self.shape[0] * out_length
        out = np.empty(size, np.float32) if trial else \
            self._buffer(1, ("output",), size, (g.batch, threads), zeroed=False)
        view = np.ndarray((self.shape[0], g.ho, g.out_width, g.batch), np.float32, out,
                          strides=(out_length * 4, g.out_width * g.batch * 4, g.batch * 4, 4))
        return out, view[:, :, :g.wo]

    def paths(self) -> set[str]:
        """What ran the calls made so far: "generated" (this layer's code), "kernel",
        "winograd", or "numba" (no compiled library, or a dense layer)."""
        return {job.get("path", "numba") for job in self._jobs.values()}

    def runs_winograd_at(self, height: int, width: int, batch: int = 4) -> bool:
        """Whether calls on inputs of this size run Winograd, on chunks of `batch` images (a
        single image has its own threshold, `winograd.pays`)."""
        return self._runs_winograd(self.geometry((self.shape[1], height, width, batch)))

    def _runs_winograd(self, g: Geometry) -> bool:
        """Winograd for this call: the layer qualifies, its output is whole 4 x 4 tiles, and
        the chunk is whole vectors of 4 images or more (chunks of 8 with AVX-512, 4 without)
        or a single image (whose transforms take runs of tiles as their vectors); other
        chunks would run the transforms one float at a time."""
        return self.winograd and winograd.fits(g.ho, g.wo) and \
            (g.batch % 4 == 0 or g.batch == 1) and \
            (self.winograd_always or
             winograd.pays(self.density, self.shape[1], g.ho, g.wo, single=g.batch == 1))

    def _winograd_job(self, job: dict, g: Geometry, threads: int, out: np.ndarray | None,
                      out_stride: int, view: np.ndarray | None, trial: bool = False) -> dict:
        """`job` completed for the Winograd path: its output (its own buffer, or the
        consumer's planes) and the bound call, taking `bind(relu, residual)` as the sparse
        kernel's does (`trial`: as `_sparse_job`)."""
        if self._winograd_weights is None:
            self._winograd_weights = winograd.transformed_weights(self.dense_weight())
        row = g.wq * g.batch
        if out is None:
            out_stride = g.ho * row
            out, view = self._own_output(g, out_stride, threads, trial)
        job["view"] = view
        team = threads if self.nonzeros * g.length >= PARALLEL_MIN_MACS else 1

        def bind(relu: bool, residual: tuple[int, int] | None = None) -> Callable[[], None]:
            return winograd.bind(self._winograd_weights, self.bias, job["planes"][0], g.ho,
                                 g.wo, out, out_stride, row, team, relu,
                                 None if residual is None else (*residual, row))

        job.update(bind=bind, run=bind(self.relu), keep=(out,), residual=None, path="winograd")
        return job

    def dense_weight(self) -> np.ndarray:
        """The layer's (O, C, kh, kw) weights as the kernels run them (normalization folded
        in), from the CSR or dense matrix; stride 1 only (where Winograd runs)."""
        if self.dense:
            return self.matrix.reshape(self.shape).copy()
        out_chans, in_chans = self.shape[:2]
        weight = np.zeros(self.shape, np.float32)
        rows = np.repeat(np.arange(out_chans), np.diff(self.indptr))
        weight[rows, self.phase_chan % in_chans, self.drow // self.dilation,
               self.dcol // self.dilation] = self.values
        return weight

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None,
                 threads: int = 1) -> np.ndarray:
        """relu(conv(x) + residual) (relu if this layer has one), CHWN in and out."""
        job = self._job(x.shape, threads)
        s, p, planes = self.stride, self.pads[0], job["planes"]
        if x is not job["interior"]:  # not already written there by the layer before
            if job["interior"] is not None:  # the padded input (stride 1, or read in place)
                job["interior"][...] = x
            elif self.native:  # only the phases some tap reads (a 1x1 stride-2 conv: 1 of 4)
                native.split_phases(chwn_view(x), s, p, self.used_phases, planes)
            else:
                _kernels().split_phases(x, s, p, self.used_phases, planes)
        if "run" in job:
            if residual is None:
                job["run"]()
            elif self._bind_residual(job, residual):
                job["residual"][1]()
            else:  # a residual laid out otherwise: added after the kernel
                job.setdefault("without_relu", job["bind"](False))()
                view = job["view"]
                np.add(view, residual, out=view)
                if self.relu:
                    np.maximum(view, 0.0, out=view)
            return job["view"]
        return self._call_numba_or_dense(job, residual)

    def _bind_residual(self, job: dict, residual: np.ndarray) -> bool:
        """Whether the kernel can add `residual` itself: it must be laid out as the output
        stretch (same row pitch, batch innermost). Bound once per residual array."""
        if job["residual"] is not None and job["residual"][0] is residual:
            return True
        g, view = job["geometry"], job["view"]
        pitch = (g.out_width * g.batch * 4, g.batch * 4, 4)
        if residual.shape != view.shape or residual.dtype != np.float32 or \
                residual.strides[1:] != pitch or residual.strides[0] % 4:
            return False
        address = residual.__array_interface__["data"][0]
        job["residual"] = (residual, job["bind"](self.relu, (address, residual.strides[0] // 4)))
        return True

    def _call_numba_or_dense(self, job: dict, residual: np.ndarray | None) -> np.ndarray:
        g, src, out_chans = job["geometry"], job["src"], self.shape[0]
        relu = self.relu and residual is None
        out = np.empty((out_chans, g.length), np.float32)
        if self.dense:
            # im2col: row k of the columns is tap k's shifted stretch of the planes
            starts = self.phase_chan * g.plane + (self.drow * g.wq + self.dcol) * g.batch
            cols = np.lib.stride_tricks.sliding_window_view(src, g.length)[starts]
            np.matmul(self.matrix, cols, out=out)
            out += self.bias[:, None]
            if relu:
                np.maximum(out, 0.0, out=out)
        else:
            _kernels().sparse_conv(src, g.plane, g.wq, g.batch, self.indptr, self.phase_chan,
                                   self.drow, self.dcol, self.values, self.bias, relu, out)
        view = out.reshape(out_chans, g.ho, g.wq, g.batch)[:, :, :g.wo]
        if residual is not None:
            np.add(view, residual, out=view)
            if self.relu:
                np.maximum(view, 0.0, out=view)
        return view

    def macs(self, height: int, width: int) -> tuple[int, int]:
        """(dense, nonzero) multiply-adds per image at this input size."""
        g = self.geometry((self.shape[1], height, width, 1))
        pixels = g.ho * g.wo
        return self.weights * pixels, self.nonzeros * pixels
