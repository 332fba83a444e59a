"""The cheap ONNX ops of the sparse engine, in numpy on batch-last arrays.

A tensor the ONNX graph holds as (N, d1, ..., dk) lives here as (d1, ..., dk, N): a 4-D
activation is CHWN (what the conv kernel reads), a 2-D one (features, N). An axis a > 0 of the
graph is axis a - 1 here; the batch axis is never reduced, split or moved.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dnr_deploy.runtime.sparse.plan import UnsupportedLayerError


def batch_last_constant(value: np.ndarray, rank: int) -> np.ndarray:
    """A constant that broadcasts against a rank-`rank` graph tensor, for its batch-last
    layout: left-padded to `rank` axes, then its (size-1) batch axis moved last."""
    value = np.asarray(value, np.float32)
    if value.ndim < rank:
        value = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if value.ndim > rank or value.shape[0] != 1:
        raise UnsupportedLayerError(f"a constant of shape {value.shape} would change the batch; "
                                    "use --runtime ort")
    return np.moveaxis(value, 0, -1)


def feature_axis(axis: int, rank: int, what: str) -> int:
    """The batch-last axis of graph axis `axis` (negative counts from the end)."""
    axis = axis + rank if axis < 0 else axis
    if not 0 < axis < rank:
        raise UnsupportedLayerError(f"{what} along axis {axis} of a rank-{rank} tensor (the "
                                    "batch axis) is not supported; use --runtime ort")
    return axis - 1


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) as 0.5 + 0.5 tanh(x / 2): no overflow, and four in-place passes
    instead of the seven temporaries of exp(-|x|) and a select (efficientnet makes 65 calls a
    batch-1 image). Absolute error below 1e-7."""
    out = np.multiply(x, np.float32(0.5), dtype=np.float32)
    np.tanh(out, out=out)
    out *= np.float32(0.5)
    out += np.float32(0.5)
    return out


def hard_sigmoid(alpha: float, beta: float) -> Callable:
    return lambda x: np.clip(np.float32(alpha) * x + np.float32(beta), 0.0, 1.0)


def hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x / np.float32(6.0) + np.float32(0.5), 0.0, 1.0)


def clip(low: float | None, high: float | None) -> Callable:
    return lambda x: np.clip(x, low, high)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def reshape(features: tuple[int, ...]) -> Callable:
    """To (features..., N): row-major order within an image is kept, as ONNX Reshape does; a 0
    copies the input's size on that axis, a -1 is inferred."""
    if 0 not in features:
        return lambda x: x.reshape(*features, x.shape[-1])
    return lambda x: x.reshape(*[x.shape[i] if size == 0 else size
                                 for i, size in enumerate(features)], x.shape[-1])


def transpose(perm: list[int]) -> Callable:
    """perm of the graph's axes, batch kept first (checked by the caller)."""
    local = [p - 1 for p in perm[1:]] + [len(perm) - 1]
    return lambda x: x.transpose(local)


def concat(axis: int) -> Callable:
    return lambda *xs: np.concatenate(xs, axis=axis)


def take_slice(axis: int, start: int, stop: int) -> Callable:
    index = (slice(None),) * axis + (slice(start, stop),)
    return lambda x: x[index]


def take_part(axis: int, index: int, parts: int) -> Callable:
    """Part `index` of `parts` along `axis`, each ceil(size / parts) long (ONNX Split)."""
    def part(x: np.ndarray) -> np.ndarray:
        size = -(-x.shape[axis] // parts)
        return x[(slice(None),) * axis + (slice(index * size, (index + 1) * size),)]

    return part


def mean(axes: tuple[int, ...], keepdims: bool) -> Callable:
    return lambda x: x.mean(axis=axes, keepdims=keepdims, dtype=np.float32)


def channel_affine(scale: np.ndarray, shift: np.ndarray) -> Callable:
    """A batch norm no conv could take over: x * scale + shift per channel (axis 0 here)."""
    scale = scale.astype(np.float32).reshape(-1, 1, 1, 1)
    shift = shift.astype(np.float32).reshape(-1, 1, 1, 1)
    return lambda x: x * scale + shift


def pool_output(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                dilation: int, ceil: bool) -> int:
    """Output length of a pooling window run (PyTorch's and ONNX Runtime's rule: with
    ceil_mode, a last window must start inside the input or its leading padding)."""
    span = size + pad_begin + pad_end - ((kernel - 1) * dilation + 1)
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


class WindowPool:
    """Max or average pooling of any kernel, stride, padding, dilation and ceil mode on CHWN
    arrays: the padded input, then one strided view per window tap reduced into the output.
    (The k x k / stride k case without padding runs the compiled `pooling.MaxPool` instead.)"""

    def __init__(self, kind: str, kernel: tuple[int, int], stride: tuple[int, int],
                 pads: tuple[int, int, int, int], dilation: tuple[int, int], ceil: bool,
                 count_include_pad: bool) -> None:
        self.kind, self.kernel, self.stride, self.pads = kind, kernel, stride, pads
        self.dilation, self.ceil, self.count_include_pad = dilation, ceil, count_include_pad
        self._divisors: dict[tuple[int, int], np.ndarray] = {}

    def _padded(self, x: np.ndarray, fill: float) -> tuple[np.ndarray, int, int]:
        _, height, width, _ = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.pads
        ho = pool_output(height, kh, sh, top, bottom, dh, self.ceil)
        wo = pool_output(width, kw, sw, left, right, dw, self.ceil)
        need_h = (ho - 1) * sh + (kh - 1) * dh + 1
        need_w = (wo - 1) * sw + (kw - 1) * dw + 1
        padded = np.full((x.shape[0], max(need_h, top + height), max(need_w, left + width),
                          x.shape[3]), fill, np.float32)
        padded[:, top:top + height, left:left + width] = x
        return padded, ho, wo

    def _reduce(self, padded: np.ndarray, ho: int, wo: int, combine: Callable) -> np.ndarray:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        out = None
        for i in range(kh):
            for j in range(kw):
                tap = padded[:, i * dh:i * dh + (ho - 1) * sh + 1:sh,
                             j * dw:j * dw + (wo - 1) * sw + 1:sw]
                out = tap.copy() if out is None else combine(out, tap, out=out)
        return out

    def _divisor(self, height: int, width: int) -> np.ndarray:
        """How many cells each average window counts: the input's, plus the real padding's
        with count_include_pad (never the ceil mode's extension), as ONNX Runtime does."""
        key = (height, width)
        if key not in self._divisors:
            top, left, bottom, right = self.pads
            ones = np.ones((1, height, width, 1), np.float32)
            padded, ho, wo = self._padded(ones, 0.0)
            if self.count_include_pad:
                padded[:, :top + height + bottom, :left + width + right] = 1.0
            self._divisors[key] = self._reduce(padded, ho, wo, np.add)
        return self._divisors[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "max":
            padded, ho, wo = self._padded(x, -np.inf)
            return self._reduce(padded, ho, wo, np.maximum)
        padded, ho, wo = self._padded(x, 0.0)
        return self._reduce(padded, ho, wo, np.add) / self._divisor(x.shape[1], x.shape[2])


def global_max(x: np.ndarray) -> np.ndarray:
    return x.max(axis=(1, 2), keepdims=True)


BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
