"""The sparse runtime against ONNX Runtime dense: VGG16 and ResNet-18 (CIFAR variants, 32x32)
and the embedded default's small net (1x8x8) at several densities with random irregular masks
(DNR's initial masks; latency does not depend on which weights survive, only on how many), per
batch size and thread count. The engine loads
each model as deployed: its exported sparse-initializer ONNX file (`--front fx`: the earlier
torch.fx trace of the module). Both runtimes get the same thread count and take turns
(dnr-bench's `time_sessions`; `--turn 5`: five timed calls after an untimed one, so each is
timed with its own weights in cache, as deployed alone).

speedup = ORT dense p50 / sparse p50; bound = dense MACs / nonzero MACs (conv + linear: what a
perfect sparse kernel could gain); efficiency = speedup / bound. Parity with the masked PyTorch
model (max |logit difference|, argmax) is checked before timing.

    .venv/bin/python benchmarks/sparse_runtime.py --densities 0.05 --batches 1 16 64 --turn 5
    .venv/bin/python benchmarks/sparse_runtime.py --models small --name sparse_runtime_small_net
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from common import write_results

from dnr_deploy.export.onnx import export_onnx, sparsify_initializers
from dnr_deploy.models import create_model
from dnr_deploy.runtime.bench import machine_info, time_sessions
from dnr_deploy.runtime.session import create_session
from dnr_deploy.runtime.sparse import build_from_onnx, build_sparse_model
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


def bench_model(name: str, densities: list[float], batches: list[int], threads: list[int],
                runs: int, turn: int, folder: Path, front: str = "onnx") -> dict:
    shape = SHAPES[name]
    dense_path = folder / f"{name}.onnx"
    export_onnx(masked_model(name, 1.0), torch.zeros(1, *shape), dense_path, opset=18)
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, *shape), dtype=np.float32) for b in batches}
    rows = {}
    for density in densities:
        model = masked_model(name, density)
        sparse_path = folder / f"{name}.{density:g}.onnx"
        if front == "onnx":  # as deployed: dnr-export's sparse-initializer model.onnx
            export_onnx(model, torch.zeros(1, *shape), sparse_path, opset=18)
            sparsify_initializers(sparse_path, set(prunable_weights(model)))
        for t in threads:
            sparse = build_from_onnx(onnx.load(str(sparse_path)), shape, threads=t) \
                if front == "onnx" else build_sparse_model(model, shape, threads=t)
            macs = sparse.macs(shape)
            bound = macs["dense"] / macs["nonzero"]
            with torch.no_grad():
                ref = model(torch.from_numpy(inputs[batches[0]])).numpy()
            got = sparse(inputs[batches[0]])
            parity = {"max_abs": float(np.abs(got - ref).max()),
                      "same_argmax": bool((got.argmax(1) == ref.argmax(1)).all())}
            session = create_session(dense_path, "cpu", t)[0]
            for batch, x in inputs.items():
                n = runs if batch == 1 else max(runs // 3, 5)
                timed = time_sessions({"ort_dense": session, "sparse": sparse}, x, 3, n, turn)
                speedup = timed["ort_dense"]["p50_ms"] / timed["sparse"]["p50_ms"]
                row = {"density": density, "threads": t, "batch": batch, "runs": n,
                       "ort_dense_p50_ms": timed["ort_dense"]["p50_ms"],
                       "sparse_p50_ms": timed["sparse"]["p50_ms"], "speedup": speedup,
                       "nonzero_mac_bound": bound, "efficiency": speedup / bound,
                       "sparse_gmacs": macs["nonzero"] * batch
                       / timed["sparse"]["p50_ms"] / 1e6, "parity": parity}
                rows[f"d{density:g}-t{t}-b{batch}"] = row
                print(f"{name:<9} d={density:<5g} t={t} b={batch:<3} ORT "
                      f"{row['ort_dense_p50_ms']:8.2f} ms  sparse {row['sparse_p50_ms']:8.2f} ms  "
                      f"speedup {speedup:5.2f}x  bound "
                      f"{bound:5.1f}x  eff {speedup / bound:.2f}  {row['sparse_gmacs']:.1f} GMAC/s"
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
    parser.add_argument("--front", choices=["onnx", "fx"], default="onnx",
                        help="onnx: the engine loads the exported model.onnx (as load_sparse "
                             "does); fx: it traces the PyTorch module (the earlier front end)")
    args = parser.parse_args()
    data = {"args": vars(args), "machine": machine_info(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            data["models"][name] = bench_model(name, args.densities, args.batches, args.threads,
                                               args.runs, args.turn, Path(tmp), args.front)
    print(write_results(args.name, data))


if __name__ == "__main__":
    main()
