"""Where the time goes, layer by layer: the sparse engine beside DeepSparse 1.8 on the
DNR-trained VGG16 and ResNet-18 (density 0.05, 32x32; dnr_masks.py), one thread, one batch
size. sparse_runtime.py says which runtime is faster; this says in which layers.

The engine's side is `SparseModel.step_times` (each step's mean milliseconds). DeepSparse's is
its own debug analysis, which fuses layers ("pyramids" run several convs over tiles) and names
the ONNX tensors each of its layers computes. Each row is one DeepSparse layer holding at least
one conv, beside the engine's steps that compute the same convs; what neither side attributes
to a conv (pools, reshapes, the input's normalization) is one last row. GMAC/s counts nonzero
multiply-adds only, so a dense method on a sparse layer (Winograd) shows as its effective rate.

    cd benchmarks; python deepsparse_layers.py --models vgg16 resnet18 --batch 16 \
        --deepsparse ../.venv-deepsparse/bin/python
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnx
from common import pin_cpus, write_results
from dnr_masks import dnr_deploy_dir, input_shape
from side_by_side import DeepSparse, call_runner

from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.sparse import build_from_onnx

LINEAR_OPS = {"Conv", "Gemm", "MatMul"}
FUSED_OPS = {"BatchNormalization", "Add", "Relu", "Clip"}  # what a conv step takes after it


def conv_tensors(graph: onnx.GraphProto, steps: list[str]) -> dict[str, str]:
    """Each engine step's conv output tensor: a step is named by the last node it fuses
    (Conv -> BatchNormalization -> Add -> Relu), so walk back to the Conv; at an Add, the
    fused conv is the input that no other step computes (the other is the shortcut)."""
    producer = {out: node for node in graph.node for out in node.output}
    own = set(steps)
    found = {}
    for step in steps:
        name = step
        while name in producer and producer[name].op_type in FUSED_OPS:
            node = producer[name]
            inputs = [i for i in node.input if i in producer]
            if node.op_type == "Add":
                inputs = [i for i in inputs if i not in own] or inputs
            if not inputs:
                break
            name = inputs[0]
        if name in producer and producer[name].op_type in LINEAR_OPS:
            found[step] = name
    return found


def _rate(macs: int, ms: float) -> float | None:
    return macs / ms / 1e6 if ms > 0 and macs else None


def compare(name: str, density: float, batch: int, rounds: int, deepsparse: str) -> dict:
    """The per-layer table of one model: our steps and DeepSparse's layers, matched by conv."""
    deploy = dnr_deploy_dir(name, density)
    model = onnx.load(str(deploy / "model.onnx"))
    shape = input_shape(deploy)
    pin_cpus(1)  # before the engine and the DeepSparse worker start their threads
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    engine = build_from_onnx(model, shape, threads=1)
    ours = engine.step_times(x, rounds)
    calls = call_runner(lambda: engine(x))(rounds)
    side = DeepSparse(deepsparse, model, x, 1)
    try:
        theirs = side.layers(rounds)
        version = side.version
    finally:
        side.close()
    conv_of = conv_tensors(model.graph, [row["step"] for row in ours])
    rows, claimed = [], set()
    for layer in theirs["layers"]:
        tensors = set(layer["tensors"].split(","))
        steps = [row for row in ours if conv_of.get(row["step"]) in tensors]
        if not steps:
            continue
        claimed.update(row["step"] for row in steps)
        nonzero = sum(row.get("nonzero_macs", 0) for row in steps)
        dense = sum(row.get("dense_macs", 0) for row in steps)
        ms = sum(row["ms"] for row in steps)
        rows.append({"deepsparse_layer": layer["name"], "steps": [row["step"] for row in steps],
                     "deepsparse_ms": layer["ms"], "ms": ms,
                     "density": nonzero / dense if dense else None,
                     "winograd": any(row.get("winograd") for row in steps),
                     "nonzero_macs": nonzero, "gmacs": _rate(nonzero, ms),
                     "deepsparse_gmacs": _rate(nonzero, layer["ms"])})
    matched_theirs = sum(row["deepsparse_ms"] for row in rows)
    rows.append({"deepsparse_layer": "everything else",
                 "steps": [row["step"] for row in ours if row["step"] not in claimed],
                 "deepsparse_ms": sum(layer["ms"] for layer in theirs["layers"]) - matched_theirs,
                 "ms": sum(row["ms"] for row in ours if row["step"] not in claimed)})
    for row in rows:
        row["deepsparse_time_over_ours"] = row["deepsparse_ms"] / row["ms"] if row["ms"] else None
        print(f"{name:9s} {row['deepsparse_layer']:26s} ours {row['ms']:7.3f} ms  DeepSparse "
              f"{row['deepsparse_ms']:7.3f} ms  ({', '.join(row['steps'])[:40]})")
    return {"batch": batch, "deploy_dir": str(deploy), "deepsparse_version": version,
            "call_ms_p50": statistics.median(calls), "deepsparse_total_ms": theirs["total_ms"],
            "steps": ours, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"],
                        choices=["vgg16", "resnet18"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--deepsparse", metavar="PYTHON", required=True,
                        help="a Python with deepsparse 1.8 installed (deepsparse_worker.py)")
    parser.add_argument("--name", default="deepsparse_layers")
    args = parser.parse_args()
    data = {"args": vars(args), "machine": machine_info(),
            "models": {name: compare(name, args.density, args.batch, args.rounds,
                                     args.deepsparse) for name in args.models}}
    print(write_results(args.name, data))


if __name__ == "__main__":
    main()
