"""The sparse engine against ONNX Runtime dense, and DeepSparse beside them: VGG16 and ResNet-18
(CIFAR variants, 32x32) and the embedded default's small net (1x8x8), per density, batch size
and thread count, on the masks users get (`--masks dnr`: DNR-trained runs, dnr_masks.py; DNR
keeps the early, MAC-heavy layers denser) or random uniform ones (`--masks random`).

The engine loads each model as deployed: the sparse-initializer model.onnx. ONNX Runtime runs
the same graph with its zeros stored (the dense baseline); DeepSparse 1.8 too, in its own venv
(`--deepsparse PYTHON`, deepsparse_worker.py). The runtimes take turns (`--turn 5`: five timed
calls after an untimed one, so each is timed with its own weights in cache, as deployed alone).

speedup = ORT dense p50 / p50; bound = dense MACs / nonzero MACs (conv + linear: what a perfect
sparse kernel could gain); efficiency = speedup / bound. Parity with ONNX Runtime (max |logit
difference|, argmax) is recorded with every row.

    PYTHONPATH=. .venv/bin/python benchmarks/sparse_runtime.py --masks dnr random \
        --models vgg16 resnet18 --densities 0.05 --batches 1 16 64 --threads 1 2 --turn 5 \
        --deepsparse .venv-deepsparse/bin/python --name sparse_engine_side_by_side
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from common import pin_cpus, write_results
from dnr_masks import dnr_deploy_dir, input_shape
from side_by_side import DeepSparse, call_runner, dense_copy, time_in_turns

from dnr_deploy.deploydir.names import INPUT_NAME
from dnr_deploy.export.onnx import export_onnx, sparsify_initializers
from dnr_deploy.models import create_model
from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.session import create_session
from dnr_deploy.runtime.sparse import build_from_onnx
from dnr_deploy.runtime.sparse.native import kernel_name
from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks

SHAPE = [3, 32, 32]
SHAPES = {"vgg16": SHAPE, "resnet18": SHAPE, "small": [1, 8, 8]}  # small: the digits' size


def masked_model(name: str, density: float) -> torch.nn.Module:
    torch.manual_seed(0)
    chans = SHAPES[name][0]
    model = create_model(name, 10, chans, [0.5] * chans, [0.25] * chans).eval()
    if density < 1:
        weights = prunable_weights(model)
        masks = random_masks({n: w.detach() for n, w in weights.items()}, density,
                             torch.Generator().manual_seed(0))
        apply_masks(model, masks)
    return model


def sparse_onnx(name: str, density: float, masks: str, folder: Path) -> tuple:
    """(model.onnx as deployed, its input shape): random masks on a seeded network, exported
    here as dnr-export does (sparse initializers); or a DNR run's deploy dir (dnr_masks.py)."""
    if masks == "dnr":
        deploy = dnr_deploy_dir(name, density)
        shape = input_shape(deploy)
        return onnx.load(str(deploy / "model.onnx")), list(shape)
    shape = SHAPES[name]
    model = masked_model(name, density)
    path = folder / f"{name}.{density:g}.onnx"
    export_onnx(model, torch.zeros(1, *shape), path, opset=18)
    sparsify_initializers(path, set(prunable_weights(model)))
    return onnx.load(str(path)), shape


def bench_model(name: str, densities: list[float], batches: list[int], threads: list[int],
                runs: int, turn: int, folder: Path, masks: str = "random",
                deepsparse: str | None = None) -> dict:
    """Speedups over ONNX Runtime dense (the same graph, zeros stored) of the sparse engine
    and, with `deepsparse` (a Python with deepsparse installed), DeepSparse, in turns."""
    rng = np.random.default_rng(0)
    rows = {}
    for density in densities:
        model, shape = sparse_onnx(name, density, masks, folder)
        inputs = {b: rng.random((b, *shape), dtype=np.float32) for b in batches}
        dense_path = folder / f"{name}.{masks}.{density:g}.dense.onnx"
        onnx.save(dense_copy(model), dense_path)
        for t in threads:
            cpus = pin_cpus(t)  # before the engine, ORT and DeepSparse start their threads
            engine = build_from_onnx(model, shape, threads=t)
            # with N threads, a 1-thread engine in the same turns: "N threads never slower than
            # one" is a ratio of one run, not of rows timed minutes apart on a shared machine
            single = build_from_onnx(model, shape, threads=1) if t > 1 else None
            # and a second one, the control: how far two identical engines' p50s part in the
            # same turns (buffers at other addresses, the host's noise), beside which the 2-thread
            # engine's ratio to the first is read
            control = build_from_onnx(model, shape, threads=1) if t > 1 else None
            macs = engine.macs(shape)
            bound = macs["dense"] / macs["nonzero"]
            session = create_session(dense_path, "cpu", t)[0]
            for batch, x in inputs.items():
                feed = {INPUT_NAME: x}
                ref = session.run(None, feed)[0]
                got = engine(x)
                parity = {"max_abs": float(np.abs(got - ref).max()),
                          "same_argmax": bool((got.argmax(1) == ref.argmax(1)).all())}
                runners = {"ort_dense": call_runner(lambda s=session, f=feed: s.run(None, f)),
                           "sparse": call_runner(lambda e=engine, x=x: e(x))}
                if single is not None:
                    runners["sparse_1_thread"] = call_runner(lambda e=single, x=x: e(x))
                    runners["sparse_1_thread_control"] = call_runner(lambda e=control, x=x: e(x))
                side = DeepSparse(deepsparse, model, x, t) if deepsparse else None
                if side:
                    runners["deepsparse"] = side.turn
                    parity["deepsparse_max_abs"] = float(np.abs(side.logits() - ref).max())
                # two turns at least, so that no runtime always follows the same one (with one
                # turn the 2-thread engine always ran right after ONNX Runtime's workers)
                n = runs if batch == 1 else max(runs // 3, 2 * turn)
                p50 = time_in_turns(runners, n, turn)
                if side:
                    side.close()
                speedup = p50["ort_dense"] / p50["sparse"]
                row = {"masks": masks, "density": density, "threads": t, "batch": batch,
                       "runs": n, "ort_dense_p50_ms": p50["ort_dense"],
                       "sparse_p50_ms": p50["sparse"], "speedup": speedup,
                       "nonzero_mac_bound": bound, "efficiency": speedup / bound,
                       "sparse_gmacs": macs["nonzero"] * batch / p50["sparse"] / 1e6,
                       "kernel": kernel_name(), "parity": parity, "cpus": cpus}
                line = ""
                if single is not None:
                    row.update(sparse_1_thread_p50_ms=p50["sparse_1_thread"],
                               threads_speedup=p50["sparse_1_thread"] / p50["sparse"],
                               split=engine.split_of(batch),
                               control_speedup=p50["sparse_1_thread"] /
                               p50["sparse_1_thread_control"])
                    line += (f"  x{row['threads_speedup']:.2f} of 1 thread ({row['split']}; "
                             f"control x{row['control_speedup']:.2f})")
                if side:
                    row.update(deepsparse_version=side.version,
                               deepsparse_p50_ms=p50["deepsparse"],
                               deepsparse_speedup=p50["ort_dense"] / p50["deepsparse"],
                               deepsparse_efficiency=p50["ort_dense"] / p50["deepsparse"] / bound)
                    line += (f"  DeepSparse {p50['deepsparse']:8.2f} ms "
                             f"{row['deepsparse_speedup']:5.2f}x")
                rows[f"{masks}-d{density:g}-t{t}-b{batch}"] = row
                print(f"{name:<9} {masks:<6} d={density:<5g} t={t} b={batch:<3} ORT "
                      f"{row['ort_dense_p50_ms']:8.2f} ms  sparse {row['sparse_p50_ms']:8.2f} ms  "
                      f"speedup {speedup:5.2f}x  bound "
                      f"{bound:5.1f}x  eff {speedup / bound:.2f}{line}"
                      f"  parity {parity['max_abs']:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"],
                        choices=sorted(SHAPES))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--turn", type=int, default=1,
                        help="timed calls a runtime makes in a row (after one untimed call) "
                             "before the other takes over; 1: they alternate call by call")
    parser.add_argument("--name", default="sparse_runtime")
    parser.add_argument("--masks", nargs="+", choices=["dnr", "random"], default=["random"],
                        help="dnr: DNR-trained runs (dnr_masks.py); random: uniform masks")
    parser.add_argument("--deepsparse", metavar="PYTHON",
                        help="a Python with deepsparse 1.8 installed: time it beside the engine")
    args = parser.parse_args()
    data = {"args": vars(args), "machine": machine_info(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            data["models"][name] = {}
            for masks in args.masks:
                data["models"][name].update(bench_model(
                    name, args.densities, args.batches, args.threads, args.runs, args.turn,
                    Path(tmp), masks, args.deepsparse))
    print(write_results(args.name, data))


if __name__ == "__main__":
    main()
