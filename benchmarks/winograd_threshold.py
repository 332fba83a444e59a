"""Where Winograd pays: one 3x3 stride-1 conv layer (VGG16 / ResNet-18 sizes, a chunk of 8
images, 1 thread) in the sparse kernel against Winograd F(4x4, 3x3), at densities 0.1 to 0.8.

Prints and records sparse time / Winograd time (above 1: Winograd is faster); the best of 7
rounds of 5 calls each, so a slow spell of the machine does not decide it. The rule in
`winograd.pays` (dnr_deploy/runtime/sparse/winograd.py) is read off this table.

    .venv/bin/python benchmarks/winograd_threshold.py
"""

from __future__ import annotations

import argparse

import numpy as np
from common import write_results
from sparse_threshold import ratio_sweep

from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse.plan import SparseConv

# (channels in, out, input size): VGG16's and ResNet-18's 3x3 layers at 32x32 inputs, their
# first layer, and a narrow one
LAYERS = ((3, 64, 32), (16, 16, 32), (64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4))


def sparse_and_winograd(weight: np.ndarray, bias: np.ndarray) -> tuple:
    sparse = SparseConv(weight, bias, 1, 1, True)
    sparse.winograd = False
    fast = SparseConv(weight, bias, 1, 1, True)
    fast.winograd_always = True  # whatever winograd.pays says
    return sparse, fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8])
    parser.add_argument("--batch", type=int, default=8, help="images a call (a chunk)")
    parser.add_argument("--name", default="winograd_threshold")
    args = parser.parse_args()
    rows = ratio_sweep(LAYERS, args.densities, args.batch, sparse_and_winograd,
                       "sparse / Winograd time")
    write_results(args.name, {"args": vars(args), "machine": machine_info(), "layers": rows})


if __name__ == "__main__":
    main()
