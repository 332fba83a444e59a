"""Winograd on and off in the same engine, whole networks on DNR-trained masks: the DNR runs of
VGG16 and ResNet-18 at 32x32 (dnr_masks.py), 1 and 2 threads, timed in turns in one run.

Prints and records each engine's p50 ms, the ratio (off / on: above 1 Winograd is faster), and
both engines' largest logit difference from ONNX Runtime on the timed batch.

    cd benchmarks; python winograd_ab.py --batches 16 64
"""

from __future__ import annotations

import argparse

import numpy as np
from common import pin_cpus, write_results
from dnr_masks import dnr_deploy_dir, input_shape
from side_by_side import call_runner, time_in_turns

from dnr_deploy.deploydir.names import INPUT_NAME
from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.session import create_session
from dnr_deploy.runtime.sparse import load_sparse
from dnr_deploy.runtime.sparse.plan import SparseConv


def engine(deploy, threads: int, winograd: bool):
    model = load_sparse(deploy, threads=threads)
    for layer, _ in model.layers:
        if isinstance(layer, SparseConv) and not winograd:
            layer.winograd = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--turn", type=int, default=3)
    parser.add_argument("--name", default="winograd_ab")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = {}
    for name in args.models:
        deploy = dnr_deploy_dir(name)
        shape = input_shape(deploy)
        for threads in args.threads:
            pin_cpus(threads)
            engines = {"sparse": engine(deploy, threads, False),
                       "winograd": engine(deploy, threads, True)}
            session = create_session(deploy / "model.onnx", "cpu", threads)[0]
            for batch in args.batches:
                x = rng.random((batch, *shape), dtype=np.float32)
                ref = session.run(None, {INPUT_NAME: x})[0]
                parity = {k: float(np.abs(e(x) - ref).max()) for k, e in engines.items()}
                p50 = time_in_turns({k: call_runner(lambda e=e, x=x: e(x))
                                     for k, e in engines.items()}, args.runs, args.turn)
                row = {"threads": threads, "batch": batch, "sparse_p50_ms": p50["sparse"],
                       "winograd_p50_ms": p50["winograd"],
                       "ratio": p50["sparse"] / p50["winograd"],
                       "max_abs_vs_ort": parity}
                rows[f"{name}-t{threads}-b{batch}"] = row
                print(f"{name:<9} t={threads} b={batch:<3} sparse kernel {p50['sparse']:8.2f} ms"
                      f"  with Winograd {p50['winograd']:8.2f} ms  {row['ratio']:.2f}x  "
                      f"vs ORT {parity['sparse']:.1e} / {parity['winograd']:.1e}", flush=True)
    write_results(args.name, {"args": vars(args), "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
