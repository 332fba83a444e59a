"""Winograd on and off in the same engine, whole networks on DNR-trained masks: the DNR runs of
VGG16 and ResNet-18 at 32x32 (dnr_masks.py), 1 and 2 threads, timed in turns in one run.

Prints and records each engine's p50 ms, the ratio (off / on: above 1 Winograd is faster), and
both engines' largest logit difference from ONNX Runtime on the timed batch.

    cd benchmarks; python winograd_ab.py --batches 16 64
"""

from __future__ import annotations

import argparse

from ab_turns import cells_in_turns
from common import write_results

from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse import load_sparse
from dnr_deploy.runtime.sparse.plan import SparseConv


def engine(deploy, threads: int, winograd: bool):
    model = load_sparse(deploy, threads=threads)
    for layer, _ in model.layers:
        if isinstance(layer, SparseConv) and not winograd:
            layer.winograd = False
    return model


def variants(deploy, threads: int) -> dict:
    return {"sparse": engine(deploy, threads, False), "winograd": engine(deploy, threads, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--turn", type=int, default=3)
    parser.add_argument("--name", default="winograd_ab")
    args = parser.parse_args()
    rows = {}
    for name, threads, batch, _, _, parity, p50 in cells_in_turns(args, variants):
        row = {"threads": threads, "batch": batch, "sparse_p50_ms": p50["sparse"],
               "winograd_p50_ms": p50["winograd"], "ratio": p50["sparse"] / p50["winograd"],
               "max_abs_vs_ort": parity}
        rows[f"{name}-t{threads}-b{batch}"] = row
        print(f"{name:<9} t={threads} b={batch:<3} sparse kernel {p50['sparse']:8.2f} ms"
              f"  with Winograd {p50['winograd']:8.2f} ms  {row['ratio']:.2f}x  "
              f"vs ORT {parity['sparse']:.1e} / {parity['winograd']:.1e}", flush=True)
    write_results(args.name, {"args": vars(args), "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
