"""DNR-trained masks for the sparse-engine benchmarks: VGG16 and ResNet-18 (CIFAR variants,
32x32x3) compressed with DNR to density 0.05 on the embedded digits written as a 32x32 RGB
image folder, and the default small net on the embedded digits themselves (1x8x8), then
exported (irregular). A few epochs: the masks' shapes matter here (DNR keeps
the early, MAC-heavy layers denser than a uniform mask), not accuracy.

Runs and deploy dirs are cached under --workdir by their settings (ignored by git), so
sparse_runtime.py --masks dnr and sparse_int8.py reuse them:

    PYTHONPATH=. python benchmarks/dnr_masks.py --models vgg16 resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORKDIR = RESULTS / "runs_masks"
# The training recipe, recorded in each run's name: a change makes new runs, never reuses
# stale ones. rewire-every 8 gives about 10 rewires in 3 epochs of 29 steps; at lr 0.1 both
# networks diverged in 2 epochs (every image got the same logits, so parity checks were void).
RECIPE = ["--epochs", "3", "--lr", "0.02", "--pgd-steps", "2", "--rewire-every", "8",
          "--batch-size", "64", "--eval-samples", "200", "--robust-eval-samples", "16",
          "--eps", "8/255"]


def run_name(model: str, density: float) -> str:
    return f"{model}-d{density:g}-e3-lr0.02-p2-r8"


def digits_folder(root: Path) -> Path:
    """The embedded digits upsampled to 32x32 RGB PNGs (the end-to-end test's folder)."""
    if not (root / "train").is_dir():
        sys.path.insert(0, str(RESULTS.parent.parent))
        from tests.test_folder_pipeline import digits_folder as write

        write(root)
    return root


def dnr_deploy_dir(model: str, density: float = 0.05, workdir: Path = WORKDIR,
                   threads: int = 1, int8: bool = False) -> Path:
    """The irregular deploy dir of a DNR run of `model` (trained and exported if not cached);
    `int8`: the same run exported with --quantize int8 instead."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = ["--dataset", "digits"] if model == "small" else \
        ["--dataset", "folder", "--data-dir", str(digits_folder(workdir / "digits32"))]
    name = run_name(model, density)
    run, deploy = workdir / name, workdir / f"{name}.{'int8' if int8 else 'deploy'}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    exe = Path(sys.executable).parent
    if not (run / "run.json").is_file():
        subprocess.run([str(exe / "dnr-compress"), "--model", model, *data, "--density",
                        str(density), *RECIPE, "--out", str(run), "--quiet"], check=True,
                       env=env)
    if not (deploy / "manifest.json").is_file():
        subprocess.run([str(exe / "dnr-export"), str(run), "--out", str(deploy), "--format",
                        "onnx", *data[2:], *(["--quantize", "int8"] if int8 else [])],
                       check=True, env=env)
    return deploy


def input_shape(deploy: Path) -> list[int]:
    """A deploy dir's input shape (C, H, W), as its manifest records it."""
    return list(json.loads((deploy / "manifest.json").read_text())["input_shape"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for model in args.models:
        print(dnr_deploy_dir(model, args.density, threads=args.threads))


if __name__ == "__main__":
    main()
