"""A folder of the user's own images through compress -> export -> bench -> verify -> report
with the default's commands; the run and deploy dir name its classes, and verify reads the
folder from the manifest, or from --data-dir once it has moved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_folder(root: Path, count: int = 2000, val: int = 200) -> Path:
    """`count` PNGs, the embedded digits upsampled to 32x32 RGB, filed by class name; the
    last `val` go to val/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(count):
        k = i % len(digits.images)
        pixels = (digits.images[k] / 16 * 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB")
        folder = root / ("val" if i >= count - val else "train") / NAMES[digits.target[k]]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
    return root


def ok(args: list[str], cwd: Path) -> str:
    result = run_cli(args, cwd=cwd)
    assert result.returncode == 0, (args, result.stderr[-800:])
    return result.stdout


@pytest.mark.slow
@pytest.mark.ci
def test_own_image_folder_end_to_end(tmp_path: Path) -> None:
    digits_folder(tmp_path / "my images", count=600, val=100)  # a few steps: the flow, not accuracy
    ok(["compress", "--dataset", "folder", "--data-dir", "my images", "--epochs", "1",
        "--beta", "1", "--batch-size", "128", "--eval-samples", "64",
        "--robust-eval-samples", "4", "--eps", "8/255", "--out", "run"], tmp_path)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["class_names"] == sorted(NAMES) and run["input_shape"] == [3, 32, 32]
    assert run["dataset"]["data_dir"] == "my images"  # as the user gave it
    assert run["threat_model"]["eps"] == 8 / 255
    ok(["export", "run"], tmp_path)
    manifest = json.loads((tmp_path / "run" / "deploy" / "manifest.json").read_text())
    assert manifest["class_names"] == sorted(NAMES)
    assert manifest["dataset"]["class_names"] == sorted(NAMES)
    assert "seven" in ok(["bench", "run/deploy", "--batch", "1", "--runs", "3", "--warmup", "1"],
                         tmp_path)
    (tmp_path / "my images").rename(tmp_path / "moved")
    verify = ["verify", "run/deploy", "--attack", "pgd", "--steps", "2", "--n", "16",
              "--no-gate"]
    failed = run_cli(verify, cwd=tmp_path)
    assert failed.returncode == 2 and "my images" in failed.stderr  # names where it looked
    shown = ok([*verify, "--data-dir", "moved"], tmp_path)
    assert "10 classes: eight, five, four" in shown and "folder test images" in shown
    assert "classes" in ok(["report", "run"], tmp_path)
    # int8 calibrates on the folder's train split (export reads only the test split otherwise)
    ok(["export", "run", "--data-dir", "moved", "--quantize", "int8", "--calibration-images",
        "32", "--out", "int8"], tmp_path)
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["quantization"]
