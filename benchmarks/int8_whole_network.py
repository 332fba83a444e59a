"""Whole networks, int8 against float, sparse against dense: the DNR-trained VGG16 and ResNet-18
of dnr_masks.py, exported float and with `--quantize int8`, each run four ways in turns (1
thread unless --threads): the sparse engine (fp32), `Int8Graph` (the int8 sparse kernels on the
int8 deploy dir's graph), ONNX Runtime on the float graph with its zeros (fp32 dense) and on the
int8 QDQ graph (int8 dense, VNNI). sparse_int8.py compares the kernels layer by layer; this is
what a whole call costs.

    PYTHONPATH=. .venv/bin/python benchmarks/int8_whole_network.py --batches 1 16
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from common import write_results
from dnr_masks import dnr_deploy_dir
from side_by_side import call_runner, dense_copy, time_in_turns

from dnr_deploy.deploydir.names import INPUT_NAME, MODEL_FILE
from dnr_deploy.runtime.bench import machine_info
from dnr_deploy.runtime.session import create_session
from dnr_deploy.runtime.sparse import int8, load_sparse
from dnr_deploy.runtime.sparse.int8_graph import Int8Graph


def bench(model: str, density: float, batches: list[int], threads: int, runs: int,
          turn: int, folder: Path) -> dict:
    float_dir = dnr_deploy_dir(model, density)
    int8_dir = dnr_deploy_dir(model, density, int8=True)
    dense = folder / f"{model}.dense.onnx"
    onnx.save(dense_copy(onnx.load(str(float_dir / MODEL_FILE))), dense)
    engine = load_sparse(float_dir, threads=threads)
    graph = Int8Graph(int8_dir, threads=threads)
    ort_fp32 = create_session(dense, "cpu", threads)[0]
    ort_int8 = create_session(int8_dir / MODEL_FILE, "cpu", threads)[0]
    rows = {}
    for batch in batches:
        x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
        feed = {INPUT_NAME: x}
        reference = ort_int8.run(None, feed)[0]
        runners = {"sparse_fp32": call_runner(lambda x=x: engine(x)),
                   "int8_graph": call_runner(lambda x=x: graph(x)),
                   "ort_fp32_dense": call_runner(lambda f=feed: ort_fp32.run(None, f)),
                   "ort_int8_dense": call_runner(lambda f=feed: ort_int8.run(None, f))}
        p50 = time_in_turns(runners, runs if batch == 1 else max(5, runs // 3), turn)
        rows[f"b{batch}_t{threads}"] = {
            "batch": batch, "threads": threads, **{f"{k}_ms": v for k, v in p50.items()},
            "int8_graph_vs_ort_int8_max_abs": float(np.abs(graph(x) - reference).max())}
        print(f"{model} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in p50.items()),
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--turn", type=int, default=5)
    parser.add_argument("--name", default="int8_whole_network")
    args = parser.parse_args()
    data = {"args": vars(args), "machine": machine_info(), "int8_kernel": int8.kernel_name(),
            "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            data["models"][model] = bench(model, args.density, args.batches, args.threads,
                                          args.runs, args.turn, Path(tmp))
    write_results(args.name, data)


if __name__ == "__main__":
    main()
