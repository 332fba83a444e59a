"""Pooling steps of the sparse runtime on CHWN activations, each bound once to the compiled
kernel (`native.py`; numba's `kernels.py` where it is missing)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from dnr_deploy.runtime.sparse import native
from dnr_deploy.runtime.sparse.plan import SparseConv, _kernels, chwn_view


class _Pool:
    """A pooling step whose compiled kernel is bound once per input array: its input is a
    layer's persistent output buffer, so after the first call only the call itself remains
    (the binding costs a few microseconds, a tenth of the default net's batch-1 latency)."""

    takes_threads = True  # it keeps per-thread outputs

    def __init__(self) -> None:
        self._bound: dict[tuple, tuple] = {}

    def _run(self, x: np.ndarray, out_shape: tuple, threads: int) -> np.ndarray:
        x = chwn_view(x)
        key = (x.shape, threads, threading.get_ident())
        entry = self._bound.get(key)
        if entry is None or entry[0] is not x:
            out = entry[1] if entry is not None else self._output(out_shape, threads)
            entry = (x, out, self._bind(x, out) if native.available else None)
            self._bound[key] = entry
        if entry[2] is not None:
            entry[2]()
        else:
            self._numba(x, entry[1])
        return entry[1]

    def _output(self, shape: tuple, threads: int) -> np.ndarray:
        return np.empty(shape, np.float32)


class MaxPool(_Pool):
    """k x k max pooling with stride k on CHWN activations; like SparseConv it can write
    straight into the input planes of the stride-1 conv that reads its output (`into`)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.into: SparseConv | None = None

    def _output(self, shape: tuple, threads: int) -> np.ndarray:
        if self.into is not None and native.available:
            interior = self.into._job(shape, threads)["interior"]
            if interior is not None:  # its padded input, not polyphase planes
                return interior
        return super()._output(shape, threads)

    def _bind(self, x: np.ndarray, out: np.ndarray) -> Callable[[], None]:
        return native.max_pool_call(x, self.size, out)

    def _numba(self, x: np.ndarray, out: np.ndarray) -> None:
        _kernels().max_pool(x, self.size, out)

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        c, h, w, n = x.shape
        return self._run(x, (c, h // self.size, w // self.size, n), threads)


class GlobalAvgPool(_Pool):
    """Global average pooling: (C, H, W, N) -> (C, 1, 1, N)."""

    def _bind(self, x: np.ndarray, out: np.ndarray) -> Callable[[], None]:
        return native.global_avg_pool_call(x, out.reshape(out.shape[0], -1))

    def _numba(self, x: np.ndarray, out: np.ndarray) -> None:
        _kernels().global_avg_pool(x, out.reshape(out.shape[0], -1))

    def __call__(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        return self._run(x, (x.shape[0], 1, 1, x.shape[3]), threads)
