"""`dnr-run`: an irregular deploy dir on the sparse engine, with numpy and onnx only (the
runtime-only install's command; the full install has it too). An int8 deploy dir (dnr-export
--quantize int8) runs its int8 CSR on the int8 kernels (`int8_graph.Int8Graph`).

    dnr-run DEPLOY_DIR --images x.npy             # float32 NCHW in [0, 1] -> one class a line
    dnr-run DEPLOY_DIR --images x.npy --logits out.npy
    dnr-run DEPLOY_DIR --batch 1,16 --runs 50     # latency on random images, p50 per batch
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

MAX_THREADS = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dnr-run", description=__doc__.splitlines()[0])
    parser.add_argument("deploy_dir", help="an irregular deploy dir (dnr-export's output)")
    parser.add_argument("--images", help=".npy of float32 NCHW images in [0, 1]: prints the "
                        "predicted class of each, one a line")
    parser.add_argument("--logits", help="with --images: also write the logits to this .npy")
    parser.add_argument("--batch", default="1,16", help="batch sizes to time (no --images)")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per batch size")
    parser.add_argument("--threads", type=int, default=1, help="threads of the sparse kernels")
    parser.add_argument("--json", action="store_true", help="print the timing as JSON")
    return parser


def _images(path: str, shape: list[int]) -> np.ndarray:
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"--images {path!r} is not a readable .npy file ({err})") from None
    if images.ndim != 4 or list(images.shape[1:]) != shape or not np.isfinite(images).all():
        raise ValueError(f"--images must hold finite (N, {', '.join(map(str, shape))}) images; "
                         f"got shape {images.shape}")
    return images.astype(np.float32, copy=False)


def _timing(model, shape: list[int], batches: list[int], runs: int) -> dict:
    rng = np.random.default_rng(0)
    result = {}
    for batch in batches:
        x = rng.random((batch, *shape), dtype=np.float32)
        model(x)  # builds the buffers of this batch size
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
        result[str(batch)] = {"p50_ms": float(np.median(times)), "runs": runs}
    return result


def _open(deploy_dir: str, threads: int) -> tuple:
    """(the deploy dir's model, the kernel that runs it): the int8 kernels for an int8 deploy
    dir, the float engine otherwise."""
    from dnr_deploy.runtime.sparse import load_deploy_dir
    from dnr_deploy.runtime.sparse.int8 import kernel_name as int8_kernel_name
    from dnr_deploy.runtime.sparse.int8_graph import Int8Graph
    from dnr_deploy.runtime.sparse.native import kernel_name

    model = load_deploy_dir(deploy_dir, threads)
    return model, f"int8 {int8_kernel_name()}" if isinstance(model, Int8Graph) else kernel_name()


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # notices (an unsigned deploy dir) as one line each, without the source line
    warnings.showwarning = lambda message, *_, **__: print(f"dnr-run: {message}",
                                                            file=sys.stderr)
    from dnr_deploy.deploydir.manifest import ManifestError
    from dnr_deploy.runtime.sparse import NotIrregularError, UnsupportedLayerError
    from dnr_deploy.runtime.sparse.int8_graph import UnsupportedInt8Graph

    try:
        batches = [int(b) for b in args.batch.split(",")]
        if min(batches) < 1 or args.runs < 1 or not 1 <= args.threads <= MAX_THREADS:
            raise ValueError
    except ValueError:
        print(f"dnr-run: --batch takes positive integers separated by commas, --runs >= 1, "
              f"--threads 1..{MAX_THREADS}", file=sys.stderr)
        return 2
    try:
        model, kernel = _open(args.deploy_dir, args.threads)
        manifest = json.loads((Path(args.deploy_dir) / "manifest.json").read_text())
        shape = [int(n) for n in manifest["input_shape"]]
        images = _images(args.images, shape) if args.images else None
    except (ManifestError, NotIrregularError, UnsupportedLayerError, UnsupportedInt8Graph,
            ValueError, OSError) as err:
        print(f"dnr-run: {err}", file=sys.stderr)
        return 2
    if images is not None:
        logits = model(images)
        if args.logits:
            np.save(args.logits, logits)
        print("\n".join(str(int(c)) for c in logits.argmax(1)))
        return 0
    timing = _timing(model, shape, batches, args.runs)
    report = {"kernel": kernel, "threads": args.threads, "latency": timing}
    if args.json:
        print(json.dumps(report))
    else:
        for batch, row in timing.items():
            print(f"batch {batch:>4}: {row['p50_ms']:.3f} ms p50 ({report['kernel']}, "
                  f"{args.threads} thread{'s' if args.threads > 1 else ''})")
    return 0


def main() -> None:
    sys.exit(run())
