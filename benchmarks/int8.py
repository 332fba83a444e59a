"""int8 on top of channel pruning (issue 14): file size and ONNX Runtime latency of the
channel-pruned paper architectures in float and int8, and the worst-case robustness of the
trained default channel run before and after quantization.

Part 1 reuses deployment.py's channel-pruned VGG16 / ResNet-18 at 5% (random masks: latency
does not depend on the weights' values) and quantizes them with dnr-export's own function,
calibrated on uniform random images (the ranges do not change the speed). Part 2 exports the
trained default channel run (benchmarks/common.py cache) with and without --quantize int8 and
runs dnr-verify's AutoAttack-grade ensemble on both (int8: its own gradients, Square, and
transfer from the float graph).

    .venv/bin/python benchmarks/int8.py --runs 30
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS, announce, base_parser, trained_run, write_results
from deployment import paper_variants, time_variants

from dnr_deploy.export import ExportConfig, export_run
from dnr_deploy.export.quantize import choose_reduce_range, quantize_int8
from dnr_deploy.runtime.verify import VerifyConfig, verify


def paper_int8(name: str, folder: Path, batches: list[int], runs: int, threads: int) -> dict:
    paths = paper_variants(name, [0.05], folder)
    del paths["irregular 0.05"]
    float_path, macs = paths["channel 0.05"]
    int8_path = folder / f"{name}-channel-0.05-int8.onnx"
    calibration = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    quantize_int8(float_path, int8_path, calibration, choose_reduce_range("auto").reduce_range)
    paths["channel 0.05 int8"] = (int8_path, macs)
    results = time_variants(paths, batches, runs, threads)
    float_row, int8_row = results["channel 0.05"], results["channel 0.05 int8"]
    summary = {"file_ratio_int8_vs_float": int8_row["bytes"] / float_row["bytes"]}
    for batch in batches:
        summary[f"b{batch}_latency_ratio_int8_vs_float"] = (
            int8_row[f"b{batch}"]["p50_ms"] / float_row[f"b{batch}"]["p50_ms"])
    return {"variants": results, "summary": summary}


def trained_default(workdir: str, epochs: int, folder: Path) -> dict:
    run = trained_run(workdir, "dnr-channel", 0.05, 0, epochs)
    results = {}
    for label, quantize in (("float", None), ("int8", "int8")):
        out = folder / label
        deployed = export_run(ExportConfig(run_dir=str(run), out=str(out), quantize=quantize))
        report = verify(VerifyConfig(deploy_dir=str(out), no_gate=True,
                                     out=str(folder / f"{label}-reports"))).report
        results[label] = {
            "file_bytes": deployed.manifest["files"]["model.onnx"]["bytes"],
            "quantization": deployed.manifest.get("quantization"),
            "clean": report["accuracy"]["clean"], "robust": report["accuracy"]["robust"],
            "stages": report["stages"], "images": report["images"]["first"]}
    results["robust_drop_points"] = 100 * (results["float"]["robust"] - results["int8"]["robust"])
    results["clean_drop_points"] = 100 * (results["float"]["clean"] - results["int8"]["clean"])
    return results


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--ort-threads", type=int, default=1)
    parser.add_argument("--skip-trained", action="store_true")
    args = parser.parse_args()
    announce(args)
    data: dict = {"args": vars(args), "paper_architectures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result = paper_int8(name, Path(tmp), [1, 16, 64], args.runs, args.ort_threads)
            data["paper_architectures"][name] = result
            print(f"\n{name} channel 5%, ONNX Runtime CPU, {args.ort_threads} thread(s)")
            for label, row in result["variants"].items():
                print(f"  {label:<18} {row['bytes'] / 1e6:>6.2f} MB  " + "  ".join(
                    f"b{b} {row[f'b{b}']['p50_ms']:.2f} ms" for b in (1, 16, 64)))
            print(f"  int8 / float: {result['summary']}")
        if not args.skip_trained:
            data["trained_default"] = trained_default(args.workdir, args.epochs, Path(tmp))
            trained = data["trained_default"]
            for label in ("float", "int8"):
                row = trained[label]
                print(f"\ntrained default channel 5%, {label}: clean {100 * row['clean']:.2f}%, "
                      f"worst-case robust {100 * row['robust']:.2f}% on {row['images']} images, "
                      f"model.onnx {row['file_bytes'] / 1024:.1f} KiB")
            print(f"robust drop {trained['robust_drop_points']:.2f} points, clean drop "
                  f"{trained['clean_drop_points']:.2f} points")
    write_results("int8", data)
    print(f"(results folder: {RESULTS})")


if __name__ == "__main__":
    main()
