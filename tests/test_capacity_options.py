"""The capacity benchmark's two options: the default net's width multiplier (`small:K`) and the
TRADES objective beside the paper's hybrid loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dnr_deploy import CompressConfig, compress
from dnr_deploy.compress.config import ConfigError
from dnr_deploy.compress.training import HybridObjective, TradesObjective, build_objective
from dnr_deploy.models import ModelSpecError, check_model_spec, create_model
from dnr_deploy.models.external import is_external_spec
from tests.helpers import assert_clean_failure, run_cli


def _weights(spec: str) -> int:
    model = create_model(spec, 10, 1, [0.5], [0.25])
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and
               p.dim() > 1)


def test_width_multiplies_every_hidden_layer() -> None:
    # conv weights scale with width^2 (both sides widen) except the first conv (1 input) and
    # the classifier (10 outputs), which scale with width
    one, two = _weights("small"), _weights("small:2")
    first, classifier = 32 * 9, 128 * 10
    assert two == 4 * (one - first - classifier) + 2 * (first + classifier)
    assert _weights("small:1") == one


@pytest.mark.parametrize("spec", ["small:0", "small:65", "resnet18:2", "nosuch:2"])
def test_bad_width_specs_are_refused(spec: str) -> None:
    with pytest.raises(ModelSpecError):
        check_model_spec(spec)


def test_width_spec_imports_nothing() -> None:
    assert not is_external_spec("small:4")
    assert is_external_spec("mypackage:factory")
    assert is_external_spec("torchvision:resnet18")


def _tiny_batch() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("small", 10, 1, [0.5], [0.25])
    return model, torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))


def test_trades_with_zero_beta_is_clean_cross_entropy() -> None:
    model, x, y = _tiny_batch()
    config = CompressConfig(loss="trades", trades_beta=0.0, eps=0.2, pgd_step_size=0.05)
    result = TradesObjective(config)(model, x, y)
    assert torch.allclose(result["loss"], F.cross_entropy(model(x), y), atol=1e-6)
    assert result["loss_adv"] >= 0  # a KL divergence


def test_trades_attack_finds_a_divergence_inside_the_ball() -> None:
    model, x, y = _tiny_batch()
    config = CompressConfig(loss="trades", trades_beta=6.0, eps=0.2, pgd_step_size=0.05)
    model.eval()
    result = TradesObjective(config)(model, x, y)
    # from x + 0.001 noise the KL is ~0; 7 ascent steps must have moved it
    assert result["loss_adv"] > 1e-4
    assert torch.isclose(result["loss"],
                         result["loss_clean"] + 6.0 * result["loss_adv"], atol=1e-5)


def test_loss_names_its_objective() -> None:
    assert isinstance(build_objective(CompressConfig()), HybridObjective)
    assert isinstance(build_objective(CompressConfig(loss="trades")), TradesObjective)
    with pytest.raises(ConfigError, match="unknown loss"):
        CompressConfig(loss="mart").resolved()
    with pytest.raises(ConfigError, match="trades_beta"):
        CompressConfig(trades_beta=-1.0).resolved()


def test_unknown_loss_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli(["compress", "--loss", "mart"], tmp_path)
    assert_clean_failure(result)
    assert "loss" in result.stderr


@pytest.mark.slow
def test_wide_trades_run_records_both_through_export(tmp_path: Path) -> None:
    run = compress(CompressConfig(model="small:2", loss="trades", epochs=1, eval_samples=20,
                                  robust_eval_samples=4, out=str(tmp_path / "run")))
    summary = json.loads((run.dir / "run.json").read_text())
    assert summary["model"]["name"] == "small:2"
    assert summary["config"]["loss"] == "trades"
    assert summary["params"]["dense"] > 3 * 241_898  # the default net's, about 4-fold
    result = run_cli(["export", str(run.dir), "--out", str(tmp_path / "deploy")], tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "deploy" / "manifest.json").read_text())
    assert "small:2" in json.dumps(manifest["model"])
