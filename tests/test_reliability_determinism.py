"""Same seed, same machine: two runs give identical masks, weights and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dnr_deploy.compress import checkpoint as ckpt
from dnr_deploy.compress.trainer import compress
from dnr_deploy.compress.training import CompressConfig, build_policy
from dnr_deploy.data import SPECS, DatasetName
from dnr_deploy.models import create_model

TIMING = ("train_seconds", "rewire_seconds")  # wall-clock figures: the only ones that vary


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / ckpt.METRICS_JSONL).read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.slow
@pytest.mark.ci
def test_same_seed_gives_identical_masks_and_metrics(tmp_path, monkeypatch):
    """Two adversarially trained runs (PGD-2; the first of 2 epochs, with two rewires;
    stopped there, which skips the final evaluation to keep this short)."""
    monkeypatch.chdir(tmp_path)
    config = {"epochs": 2, "stop_after": 1, "eval_samples": 50, "pgd_steps": 2, "seed": 7,
              "rewire_every": 10}  # rewires after steps 10 and 20 of epoch 1
    first = compress(CompressConfig(out="first", **config)).dir
    second = compress(CompressConfig(out="second", **config)).dir
    a, b = ckpt.load_checkpoint(first), ckpt.load_checkpoint(second)

    assert a["epoch"] == b["epoch"] == 1
    masks = a["policy"]["masks"]
    assert masks and masks.keys() == b["policy"]["masks"].keys()
    for name, mask in masks.items():
        assert torch.equal(mask, b["policy"]["masks"][name]), name
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["rng"]["torch_per_rank"][0], b["rng"]["torch_per_rank"][0])
    assert metrics(first) == metrics(second)
    rewires = metrics(first)[0]["rewires"]
    assert len(metrics(first)) == 1 and [r["step"] for r in rewires] == [10, 20]
    assert all(r["prune_fraction"] > 0 for r in rewires)

    # The comparison is not vacuous: another seed starts from other masks.
    spec = SPECS[DatasetName.DIGITS]
    model = create_model("small", spec.num_classes, 1, spec.mean, spec.std)
    other = build_policy(CompressConfig(seed=8).resolved(), model, torch.zeros(1, 1, 8, 8))
    start = build_policy(CompressConfig(seed=7).resolved(), model, torch.zeros(1, 1, 8, 8))
    assert any(not torch.equal(other.masks[n], start.masks[n]) for n in other.masks)
