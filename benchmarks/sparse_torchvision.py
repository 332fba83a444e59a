"""Which torchvision CNNs the sparse engine runs from their irregular ONNX export, and how fast:
each model at 3x32x32 with random 5% masks on every conv and linear weight, exported as
dnr-export does (dynamo exporter, opset 18, sparse initializers), loaded by the ONNX front end
(`build_from_onnx`), checked against ONNX Runtime (max |logit difference|, argmax) and timed
against ONNX Runtime dense at batch 1, 1 thread (dnr-bench's `time_sessions`, turns of 5).

    .venv/bin/python benchmarks/sparse_torchvision.py --models resnet18 mobilenet_v3_small
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from common import pin_cpus, write_results

from dnr_deploy.export.onnx import export_onnx, sparsify_initializers
from dnr_deploy.models import create_model
from dnr_deploy.runtime.bench import machine_info, time_sessions
from dnr_deploy.runtime.session import create_session
from dnr_deploy.runtime.sparse import UnsupportedLayerError, build_from_onnx
from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks

MODELS = ["resnet18", "mobilenet_v3_small", "mobilenet_v2", "efficientnet_b0", "squeezenet1_0",
          "densenet121", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf", "googlenet"]
SHAPE = [3, 32, 32]


def bench_one(name: str, density: float, runs: int, folder: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", 10, 3, [0.5] * 3, [0.25] * 3).eval()
    weights = prunable_weights(model)
    masks = random_masks({n: w.detach() for n, w in weights.items()}, density,
                         torch.Generator().manual_seed(0))
    apply_masks(model, masks)
    with torch.no_grad():  # keep activations' scale at 5% of the weights (else all-zero logits)
        for weight in weights.values():
            weight /= density ** 0.5
    dense_path, sparse_path = folder / f"{name}.dense.onnx", folder / f"{name}.onnx"
    export_onnx(model, torch.zeros(1, *SHAPE), dense_path, opset=18)
    sparse_path.write_bytes(dense_path.read_bytes())
    sparsify_initializers(sparse_path, set(weights))
    ops = sorted({node.op_type for node in onnx.load(str(sparse_path)).graph.node})
    try:
        start = time.perf_counter()
        engine = build_from_onnx(onnx.load(str(sparse_path)), SHAPE)
        load_seconds = time.perf_counter() - start
    except UnsupportedLayerError as err:
        return {"runs": False, "error": str(err), "ops": ops}
    x = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32)
    session = create_session(dense_path, "cpu", 1)[0]
    want = session.run(None, {"input": x})[0]
    got = engine(x)
    macs = engine.macs(SHAPE)
    timed = time_sessions({"ort_dense": session, "sparse": engine}, x[:1], 3, runs, 5)
    speedup = timed["ort_dense"]["p50_ms"] / timed["sparse"]["p50_ms"]
    return {"runs": True, "ops": ops, "load_seconds": load_seconds,
            "max_abs": float(np.abs(got - want).max()),
            "same_argmax": bool((got.argmax(1) == want.argmax(1)).all()),
            "ort_dense_p50_ms": timed["ort_dense"]["p50_ms"],
            "sparse_p50_ms": timed["sparse"]["p50_ms"], "speedup_b1": speedup,
            "nonzero_mac_bound": macs["dense"] / max(macs["nonzero"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--name", default="sparse_torchvision")
    args = parser.parse_args()
    data = {"args": vars(args), "machine": machine_info(), "shape": SHAPE, "models": {},
            "cpus": pin_cpus(1)}  # 1 thread: both runtimes on one core
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                row = bench_one(name, args.density, args.runs, Path(tmp))
            except Exception as err:  # noqa: BLE001 (a model that does not export: recorded)
                row = {"runs": False, "error": f"{type(err).__name__}: {err}"[:300]}
            data["models"][name] = row
            print(name, {k: v for k, v in row.items() if k != "ops"}, flush=True)
            write_results(args.name, data)
    print(write_results(args.name, data))


if __name__ == "__main__":
    main()
