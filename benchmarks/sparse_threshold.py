"""Where the sparse runtime's dense fallback pays: one 3x3 conv layer (VGG16's sizes, batch 4,
1 thread) in the sparse kernel against im2col + BLAS, at densities from 0.2 to 1.0.

Prints and records sparse time / dense time (below 1: the sparse kernel is faster); the best
of 7 rounds of 5 calls each, so a slow spell of the machine does not decide it.
DENSE_THRESHOLD in dnr_deploy/runtime/sparse/plan.py is read off this table.

    .venv/bin/python benchmarks/sparse_threshold.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import write_results
from threadpoolctl import threadpool_limits

from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse.plan import SparseConv

LAYERS = ((64, 32), (128, 16), (256, 8), (512, 4))  # (channels in and out, input size)


def best_seconds(conv: SparseConv, x: np.ndarray, rounds: int = 7, calls: int = 5) -> float:
    for _ in range(3):
        conv(x)
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for _ in range(calls):
            conv(x)
        times.append((time.perf_counter() - begin) / calls)
    return min(times)


def ratio_sweep(layers, densities: list[float], batch: int, pair, what: str) -> dict:
    """label -> density -> time of the first layer / time of the second, for 3x3 stride-1
    layers of (in, out channels, input size); `pair(weight, bias)` builds the two layers."""
    rng = np.random.default_rng(0)
    rows = {}
    with threadpool_limits(1):
        for chans, out_chans, size in layers:
            x = rng.standard_normal((chans, size, size, batch)).astype(np.float32)
            ratios = {}
            for density in densities:
                weight = rng.standard_normal((out_chans, chans, 3, 3)).astype(np.float32)
                weight *= rng.random(weight.shape) < density
                first, second = pair(weight, np.zeros(out_chans, np.float32))
                ratios[f"{density:g}"] = best_seconds(first, x) / best_seconds(second, x)
            label = f"{chans}x{out_chans} 3x3 at {size}x{size}"
            rows[label] = ratios
            print(f"{label:<24} {what}: " +
                  "  ".join(f"{d}: {r:.2f}" for d, r in ratios.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    parser.add_argument("--name", default="sparse_threshold")
    args = parser.parse_args()
    rows = ratio_sweep([(c, c, size) for c, size in LAYERS], args.densities, 4,
                       lambda w, b: (SparseConv(w, b, 1, 1, True, dense_threshold=1.0),
                                     SparseConv(w, b, 1, 1, True, dense_threshold=0.0)),
                       "sparse / dense time")
    write_results(args.name, {"args": vars(args), "machine": machine_info(), "layers": rows})


if __name__ == "__main__":
    main()
