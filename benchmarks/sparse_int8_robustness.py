"""Float against int8 on trained irregular runs: each run exported twice (float, and
--quantize int8), both attacked by dnr-verify (int8: white-box through the re-imported QDQ graph,
Square, transfer from model.fp32.onnx; the per-image worst case), and the int8 sparse kernels
(Int8Graph) checked against ONNX Runtime's reference int8 math on the test images. With
--int8-runtime sparse (the default) the int8 verdicts and Square's queries are the int8 sparse
engine's; --int8-runtime ort scores them by ONNX Runtime's int8 session.

    .venv/bin/python benchmarks/sparse_int8_robustness.py RUN_DIR [RUN_DIR ...] --n 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import write_results

from dnr_deploy.data import load_data, test_subset
from dnr_deploy.export.quantize import reference_session
from dnr_deploy.runtime.sparse import int8
from dnr_deploy.runtime.sparse.int8_graph import Int8Graph

BIN = Path(sys.executable).parent


def run(*args: str) -> None:
    subprocess.run([str(BIN / args[0]), *args[1:]], check=True, stdout=subprocess.DEVNULL)


def verify(deploy: Path, out: Path, n: int, steps: int | None, queries: int,
           runtime: str = "auto") -> dict:
    """dnr-verify's figures, reusing a verify.json of the same deploy dir and settings."""
    report_path = out / "verify.json"
    settings = {"n": n, "steps": steps, "queries": queries, "runtime": runtime}
    cached = json.loads(report_path.read_text()) if report_path.is_file() else None
    if cached is None or any(cached["config"].get(k) != v for k, v in settings.items()) or \
            cached["model_sha256"] != _sha256(deploy / "model.onnx"):
        run("dnr-verify", str(deploy), "--n", str(n), "--queries", str(queries),
            "--runtime", runtime, "--no-gate", "--out", str(out),
            *(["--steps", str(steps)] if steps else []))
    report = json.loads(report_path.read_text())
    return {"clean": report["accuracy"]["clean"], "worst_case": report["accuracy"]["robust"],
            "images": report["images"], "scored_by": report["attack"]["scored_by"],
            "seconds": report["seconds"],
            "stages": {f"{s['gradients']}:{s['attack']}": s["robust_after"]
                       for s in report["stages"]}}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=None,
                        help="APGD iterations (default: dnr-verify's)")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--int8-runtime", choices=["sparse", "ort"], default="sparse",
                        help="what scores the int8 deploy dir's attacks")
    parser.add_argument("--name", default="sparse_int8_robustness")
    args = parser.parse_args()
    rows = {}
    for run_dir in args.runs:
        float_dir, int8_dir = run_dir / "deploy-float", run_dir / "deploy-int8"
        for folder, extra in ((float_dir, []), (int8_dir, ["--quantize", "int8"])):
            if not (folder / "manifest.json").is_file():  # exported before: reused
                run("dnr-export", str(run_dir), *extra, "--out", str(folder), "--force")
        manifest = json.loads((int8_dir / "manifest.json").read_text())
        x, y = test_subset(load_data("digits"), None)
        images = x.numpy()
        ours = Int8Graph(int8_dir)(images)
        reference = reference_session(int8_dir / "model.onnx").run(None, {"input": images})[0]
        rows[run_dir.name] = {
            "float": verify(float_dir, run_dir / "verify-float", args.n, args.steps,
                            args.queries),
            "int8": verify(int8_dir, run_dir / f"verify-int8-{args.int8_runtime}", args.n,
                           args.steps, args.queries, args.int8_runtime),
            "quantization": manifest["quantization"],
            "int8_sparse_vs_ort_reference_max_abs": float(np.abs(ours - reference).max()),
            "int8_sparse_clean": float((ours.argmax(1) == y.numpy()).mean()),
            "test_images": len(images)}
        print(json.dumps(rows[run_dir.name], indent=1), flush=True)
    settings = {**vars(args), "runs": [str(r) for r in args.runs]}
    write_results(args.name, {"int8_kernel": int8.kernel_name(), "settings": settings,
                              "runs": rows})


if __name__ == "__main__":
    main()
