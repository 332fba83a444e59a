"""Deployment speed against the limit: ONNX Runtime latency of channel-pruned and irregular
networks against their dense baseline, and efficiency = speedup / MAC reduction (1 is the
physical limit: the latency falls exactly as much as the work).

Part 1, paper architectures at 32x32 (ResNet-18, VGG16): latency does not depend on the
weights' values, so channel masks are DNR's initial random masks at each density (the budget
is the shrunk network's weight count, as in training), shrunk with torch-pruning. Part 2, the
trained default runs of benchmarks/quality.py (seed 0), exported and timed with dnr-bench's code.

    .venv/bin/python benchmarks/deployment.py --runs 30

The sparse runtime's column (irregular networks run from their CSR weights, issue 13) is
benchmarks/sparse_runtime.py, which writes results/sparse_runtime.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, announce, base_parser, trained_run, write_results

from dnr_deploy.export import ExportConfig, export_run
from dnr_deploy.export.onnx import export_onnx, sparsify_initializers
from dnr_deploy.models import create_model
from dnr_deploy.runtime.bench import BenchConfig, bench, time_sessions
from dnr_deploy.runtime.session import create_session
from dnr_deploy.sizes import count_macs
from dnr_deploy.sparsity.masks import apply_masks, prunable_weights, random_masks
from dnr_deploy.sparsity.policy import ChannelDNR
from dnr_deploy.sparsity.surgery import shrink_model


def paper_variants(name: str, densities: list[float], folder: Path) -> dict[str, tuple]:
    """ONNX files of `name`: dense, channel-pruned at each density, irregular at 0.05."""
    torch.manual_seed(0)
    example = torch.zeros(1, 3, 32, 32)
    make = lambda: create_model(name, 10, 3, [0.5] * 3, [0.25] * 3).eval()  # noqa: E731
    variants = {}
    dense = make()
    variants["dense"] = (dense, count_macs(dense, example))
    for density in densities:
        model = make()
        policy = ChannelDNR(model, density, torch.Generator().manual_seed(0), example)
        shrunk, _ = shrink_model(model, list(policy.layout.groups.values()),
                                 policy.channel_masks, example)
        variants[f"channel {density:g}"] = (shrunk, count_macs(shrunk, example))
    irregular = make()
    weights = prunable_weights(irregular)
    masks = random_masks({n: w.detach() for n, w in weights.items()}, 0.05,
                         torch.Generator().manual_seed(0))
    apply_masks(irregular, masks)
    variants["irregular 0.05"] = (irregular, count_macs(irregular, example))
    paths = {}
    for label, (model, macs) in variants.items():
        path = folder / f"{name}-{label.replace(' ', '-')}.onnx"
        export_onnx(model, example, path, opset=18)
        if label.startswith("irregular"):
            sparsify_initializers(path, set(masks))
        paths[label] = (path, macs)
    return paths


def time_variants(paths: dict, batches: list[int], runs: int, threads: int) -> dict:
    sessions = {label: create_session(path, "cpu", threads)[0] for label, (path, _) in
                paths.items()}
    rng = np.random.default_rng(0)
    results = {}
    for batch in batches:
        x = rng.random((batch, 3, 32, 32), dtype=np.float32)
        timed = time_sessions(sessions, x, warmup=3, runs=runs if batch == 1 else max(runs // 3, 5))
        dense_ms = timed["dense"]["p50_ms"]
        for label, (path, macs) in paths.items():
            row = results.setdefault(label, {"macs": macs, "bytes": path.stat().st_size})
            speedup = dense_ms / timed[label]["p50_ms"]
            mac_reduction = paths["dense"][1] / macs
            row[f"b{batch}"] = {**timed[label], "speedup": speedup,
                                "efficiency": speedup / mac_reduction}
    return results


def trained_default(workdir: str, epochs: int, folder: Path, runs: int) -> dict:
    deploy = {}
    for method in ("dense", "dnr-channel", "dnr-irregular"):
        run = trained_run(workdir, method, 0.05, 0, epochs)
        out = folder / method
        export_run(ExportConfig(run_dir=str(run), out=str(out)))
        deploy[method] = out
    results = {}
    for method in ("dnr-channel", "dnr-irregular"):
        report = bench(BenchConfig(deploy_dir=str(deploy[method]),
                                   baseline=str(deploy["dense"]), runs=runs,
                                   out=str(folder / f"{method}-reports"))).report
        # the deploy dirs are throwaway temporary folders: record their files relative to it
        models = {label: {**model, "path": str(Path(model["path"]).relative_to(
            folder.resolve()))} for label, model in report["models"].items()}
        results[method] = {"models": models, "comparison": report["comparison"]}
    return results


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--ort-threads", type=int, default=1)
    args = parser.parse_args()
    announce(args)
    data = {"args": vars(args), "paper_architectures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paths = paper_variants(name, args.densities, Path(tmp))
            results = time_variants(paths, [1, 64], args.runs, args.ort_threads)
            data["paper_architectures"][name] = results
            print(f"\n{name} 32x32, ONNX Runtime CPU, {args.ort_threads} thread(s), p50 ms")
            print(f"{'variant':<16} {'MACs':>7} {'b1 ms':>8} {'speedup':>8} {'eff':>5} "
                  f"{'b64 ms':>8} {'speedup':>8} {'eff':>5} {'file':>9}")
            for label, row in results.items():
                mac_red = results["dense"]["macs"] / row["macs"]
                b1, b64 = row["b1"], row["b64"]
                print(f"{label:<16} {mac_red:>6.1f}x {b1['p50_ms']:>8.2f} {b1['speedup']:>7.2f}x "
                      f"{b1['efficiency']:>5.2f} {b64['p50_ms']:>8.1f} {b64['speedup']:>7.2f}x "
                      f"{b64['efficiency']:>5.2f} {row['bytes'] / 1e6:>7.2f}MB")
        data["trained_default"] = trained_default(args.workdir, args.epochs, Path(tmp),
                                                  args.runs * 3)
    for method, result in data["trained_default"].items():
        print(f"\ntrained default, {method} vs dense: {result['comparison']}")
    write_results("deployment", data)
    print(f"(results folder: {RESULTS})")


if __name__ == "__main__":
    main()
