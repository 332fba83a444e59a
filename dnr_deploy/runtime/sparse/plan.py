"""Layers of the sparse runtime: a convolution or linear layer with batch norm folded in,
stored as CSR and run by the kernels in `kernels.py` (or densely above a density threshold)."""

from __future__ import annotations

import math
import threading

import numpy as np
import scipy.sparse
import torch
from torch import nn

from dnr_deploy.runtime.sparse import kernels, native

# Above this fraction of nonzero weights a layer runs as im2col + BLAS instead of the sparse
# kernel. Measured on the 2-core Zen 3 machine, 3x3 convs of 64, 256 and 512 channels at batch
# 4 (ISSUE13_NOTES.md): the sparse kernel was faster at every density tried up to 0.5, so the
# fallback is kept for layers that are nearly dense (DNR keeps some layers so).
DENSE_THRESHOLD = 0.5
# ... and only when it holds this many weights: a tiny dense layer (the default net's first conv,
# 288 weights, or its 10x128 classifier, both kept dense by DNR) runs faster in the sparse
# kernel than through an im2col gather, a BLAS call and the BLAS thread limit around each call
# (~14 us of threadpoolctl alone, a quarter of that net's ONNX Runtime latency).
DENSE_MIN_WEIGHTS = 4096
# A layer call splits over OpenMP threads only from this many multiply-adds (nonzeros x output
# floats, garbage columns included): below it, waking a second thread costs more than it saves.
PARALLEL_MIN_MACS = 4_000_000


class UnsupportedLayerError(ValueError):
    """A layer or setting the sparse runtime has no kernel for (named, with the fix)."""


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                    norm: nn.BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a conv followed by an eval-mode batch norm, as one affine layer.

    The scale is per output channel, so a zero weight stays zero: folding keeps the mask.
    """
    weight = weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None \
        else bias.detach().double()
    if norm is not None:
        scale = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        bias = (bias - norm.running_mean.double()) * scale + norm.bias.detach().double()
    return weight.float().numpy(), bias.float().numpy()


class SparseConv:
    """A Conv2d (+ folded BatchNorm2d, + optional ReLU) on CHWN activations.

    Example: a 3x3, stride-2 conv with a nonzero at (o=0, c=5, kh=2, kw=1) reads polyphase plane
    (2 % 2, 1 % 2) = (0, 1) of channel 5, shifted by 2 // 2 = 1 row and 1 // 2 = 0 columns.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int, padding: int,
                 relu: bool, dense_threshold: float = DENSE_THRESHOLD) -> None:
        out_chans, in_chans, kh, kw = weight.shape
        self.shape, self.stride, self.padding, self.relu = weight.shape, stride, padding, relu
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        matrix = weight.reshape(out_chans, -1)
        self.density = float(np.count_nonzero(matrix)) / matrix.size
        self.dense = self.density > dense_threshold and matrix.size >= DENSE_MIN_WEIGHTS
        if self.dense:  # every tap, in the (c, kh, kw) order of the weight's columns
            self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
            columns = np.arange(matrix.shape[1])
        else:
            csr = scipy.sparse.csr_array(matrix.astype(np.float32))
            csr.sort_indices()
            self.indptr = csr.indptr.astype(np.int64)
            self.values = csr.data.astype(np.float32)
            columns = csr.indices.astype(np.int64)
        chan, tap = np.divmod(columns, kh * kw)
        row, col = np.divmod(tap, kw)
        phase = (row % stride) * stride + col % stride
        self.phase_chan = (phase * in_chans + chan).astype(np.int64)
        self.used_phases = np.zeros(stride * stride, np.bool_)
        self.used_phases[np.unique(phase)] = True
        self.drow = (row // stride).astype(np.int64)
        self.dcol = (col // stride).astype(np.int64)
        self.nonzeros = int(np.count_nonzero(matrix))
        self._offsets: dict[tuple[int, int, int], np.ndarray] = {}
        self._jobs: dict[tuple, dict] = {}

    def offsets(self, plane: int, wq: int, batch: int) -> np.ndarray:
        """Start of each nonzero's shifted stretch in the plane buffer (cached per shape)."""
        key = (plane, wq, batch)
        if key not in self._offsets:
            self._offsets[key] = np.ascontiguousarray(
                self.phase_chan * plane + (self.drow * wq + self.dcol) * batch, dtype=np.int64)
        return self._offsets[key]

    def _job(self, shape: tuple, threads: int) -> dict:
        """Everything a call on inputs of `shape` needs, made once and kept per calling thread:
        zero-bordered input buffers (only their interior is ever written, so borders and slack
        stay zero), the output and its view, the kernel's arguments."""
        key = (shape, threads, threading.get_ident())
        if key in self._jobs:
            return self._jobs[key]
        chans, height, width, batch = shape
        out_chans, _, kh, kw = self.shape
        s, p = self.stride, self.padding
        hp, wp = height + 2 * p, width + 2 * p
        ho, wo = (hp - kh) // s + 1, (wp - kw) // s + 1
        hq, wq = -(-hp // s), -(-wp // s)
        plane, length = hq * wq * batch, ho * wq * batch
        # tiles of 8, 16 or 32 floats (1, 2 or 4 AVX2 registers): the stretch is padded to one
        vectors = 1 if length <= 8 else 2 if length <= 16 else 4
        padded_length = -(-length // (8 * vectors)) * 8 * vectors
        # slack: the garbage columns of the last row of the last plane, and the padding of the
        # stretch to whole tiles, read past its end
        src = np.zeros(s * s * chans * plane + (kw + 1) * batch + padded_length - length + 32,
                       np.float32)
        job = {"src": src, "planes": src[:s * s * chans * plane].reshape(s * s, chans, hq, wq,
                                                                           batch),
               "plane": plane, "wq": wq, "length": length, "shape": (ho, wo)}
        if native.available and not self.dense:
            out = np.empty((out_chans, padded_length), np.float32)
            # blocks of the stretch sized so that the input a block reads (one stretch per
            # input channel and phase) stays near 256 KiB, L2's half on Zen 3
            block = max(8 * vectors, (65536 // (chans * s * s)) // (8 * vectors) * 8 * vectors)
            offsets = self.offsets(plane, wq, batch)
            # OpenMP inside a layer only when its work pays for waking a thread: on a loaded
            # machine each parallel region can wait a scheduler slice for a late worker
            work = self.nonzeros * length
            team = threads if work >= PARALLEL_MIN_MACS else 1
            job["native"] = native.conv_call(src, offsets, self.indptr, self.values, self.bias,
                                             self.relu, block, vectors, team, out)
            job["keep"] = offsets
            job["view"] = np.ndarray((out_chans, ho, wq, batch), np.float32, out,  # the padded
                                     strides=(out.strides[0], wq * batch * 4, batch * 4, 4)  # tails
                                     )[:, :, :wo]  # and garbage columns skipped, no copy
        self._jobs[key] = job
        return job

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        chans, height, width, batch = x.shape
        job = self._job(x.shape, threads)
        s, p, planes = self.stride, self.padding, job["planes"]
        if s == 1:
            planes[0, :, p:p + height, p:p + width] = x
        else:  # only the phases some tap reads (a 1x1 stride-2 conv reads one of four)
            kernels.split_phases(x, s, p, self.used_phases, planes)
        if "native" in job:
            job["native"]()
            return job["view"]
        src, plane, wq, length = job["src"], job["plane"], job["wq"], job["length"]
        (ho, wo), out_chans = job["shape"], self.shape[0]
        out = np.empty((out_chans, length), np.float32)
        if self.dense:
            cols = np.empty((len(self.phase_chan), length), np.float32)
            kernels.gather_columns(src, plane, wq, batch, self.phase_chan, self.drow, self.dcol,
                                   length, cols)
            np.matmul(self.matrix, cols, out=out)
            out += self.bias[:, None]
            if self.relu:
                np.maximum(out, 0.0, out=out)
        else:
            kernels.sparse_conv(src, plane, wq, batch, self.indptr, self.phase_chan, self.drow,
                                self.dcol, self.values, self.bias, self.relu, out)
        return out.reshape(out_chans, ho, wq, batch)[:, :, :wo]

    def macs(self, height: int, width: int) -> tuple[int, int]:
        """(dense, nonzero) multiply-adds per image at this input size."""
        s, p, (_, _, kh, kw) = self.stride, self.padding, self.shape
        pixels = ((height + 2 * p - kh) // s + 1) * ((width + 2 * p - kw) // s + 1)
        return math.prod(self.shape) * pixels, self.nonzeros * pixels


class SparseLinear:
    """A Linear layer on (features, N) activations: CSR, or dense above the threshold."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray,
                 dense_threshold: float = DENSE_THRESHOLD) -> None:
        self.shape = weight.shape
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.nonzeros = int(np.count_nonzero(weight))
        self.density = self.nonzeros / weight.size
        self.dense = self.density > dense_threshold and weight.size >= DENSE_MIN_WEIGHTS
        if self.dense:
            self.matrix = np.ascontiguousarray(weight, dtype=np.float32)
        else:
            csr = scipy.sparse.csr_array(weight.astype(np.float32))
            self.indptr, self.indices = csr.indptr.astype(np.int64), csr.indices.astype(np.int64)
            self.values = csr.data.astype(np.float32)

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.dense:
            return self.matrix @ x + self.bias[:, None]
        out = np.empty((self.shape[0], x.shape[1]), np.float32)
        kernels.sparse_linear(x, self.indptr, self.indices, self.values, self.bias, out)
        return out

    def macs(self) -> tuple[int, int]:
        return math.prod(self.shape), self.nonzeros


def conv_layer(conv: nn.Conv2d, norm: nn.BatchNorm2d | None, relu: bool,
               dense_threshold: float) -> SparseConv:
    """Raises:
        UnsupportedLayerError: groups, dilation, non-square kernels or strides, padding modes
            other than zeros."""
    square = lambda pair: pair[0] == pair[1]  # noqa: E731
    padding = conv.padding if not isinstance(conv.padding, str) else (None, None)
    if conv.groups != 1 or conv.dilation != (1, 1) or not square(conv.stride) or \
            not square(conv.kernel_size) or padding[0] is None or not square(padding) or \
            conv.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"the sparse runtime runs plain convolutions (groups 1, dilation 1, square kernel, "
            f"stride and zero padding); got {conv}; use --runtime ort")
    weight, bias = fold_batch_norm(conv.weight, conv.bias, norm)
    return SparseConv(weight, bias, conv.stride[0], padding[0], relu, dense_threshold)


def linear_layer(linear: nn.Linear, dense_threshold: float) -> SparseLinear:
    weight, bias = fold_batch_norm(linear.weight, linear.bias, None)
    return SparseLinear(weight, bias, dense_threshold)
