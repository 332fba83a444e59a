"""APGD and the AutoAttack-grade ensemble: the reference schedule, the eps ball and pixel
range, per-image worst case, batch independence (what lets verify repeat the training side),
and the sanity checks tripping on a model that masks its gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnr_deploy.attacks import (
    AttackName,
    EnsembleConfig,
    apgd,
    dlr_targeted_loss,
    run_ensemble,
)
from dnr_deploy.attacks.apgd import checkpoints
from dnr_deploy.attacks.checks import run_checks
from dnr_deploy.attacks.ensemble import torch_scorer
from dnr_deploy.data import load_data
from dnr_deploy.data import test_subset as first_test_images

EPS = 0.2


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained clean on the digits for a second: accurate, not robust, so every
    attack has work to do and their strengths differ."""
    torch.manual_seed(0)
    bundle = load_data("digits", None)
    x_train = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    y_train = torch.as_tensor([bundle.train[i][1] for i in range(len(bundle.train))])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    x, y = first_test_images(bundle, 96)
    return model.eval(), x, y


def test_checkpoints_follow_the_reference_schedule():
    # auto-attack: first check after 22% of 100 steps, intervals shrinking by 3 down to 6
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_dlr_targeted_loss_ignores_the_logits_scale():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    y, target = torch.arange(5), torch.arange(5, 10)
    torch.testing.assert_close(dlr_targeted_loss(3.0 * logits, y, target),
                               dlr_targeted_loss(logits, y, target))


@pytest.mark.parametrize("attack", [a.value for a in AttackName])
def test_every_attack_stays_in_the_eps_ball_and_pixel_range(digits_mlp, attack):
    model, x, y = digits_mlp
    x = x.clone()
    x[:8] = 0.0  # the clip to [0, 1] must act at the edges
    config = EnsembleConfig(attack=attack, apgd_steps=20, target_classes=3, square_queries=200)
    result = run_ensemble(model, x, y, EPS, config)
    delta = (result.x_adv - x).abs().max()
    assert delta <= EPS + 1e-6 and result.max_perturbation == pytest.approx(float(delta))
    assert result.pixel_range[0] >= 0.0 and result.pixel_range[1] <= 1.0
    assert result.robust_accuracy < result.clean  # it broke something
    broken = ~result.robust & result.clean_correct
    with torch.no_grad():  # a broken image is misclassified at the x_adv recorded for it
        assert (model(result.x_adv[torch.from_numpy(broken)]).argmax(1)
                != y[torch.from_numpy(broken)]).all()


def test_apgd_is_stronger_than_pgd20_and_the_ensemble_is_the_worst_case(digits_mlp):
    model, x, y = digits_mlp
    budget = {"apgd_steps": 50, "target_classes": 3, "square_queries": 300}
    alone = {name: run_ensemble(model, x, y, EPS, EnsembleConfig(attack=name, **budget))
             for name in ("pgd", "apgd-ce", "square", "autoattack")}
    ensemble = alone["autoattack"]
    assert alone["apgd-ce"].robust_accuracy <= alone["pgd"].robust_accuracy
    # the ensemble's first stage is APGD-CE on the same images with the same seeds
    assert ensemble.stages[0].robust_after == alone["apgd-ce"].robust_accuracy
    assert ensemble.robust_accuracy <= alone["apgd-ce"].robust_accuracy
    assert ensemble.robust_accuracy <= alone["square"].robust_accuracy + 2 / len(y)
    after = [stage.robust_after for stage in ensemble.stages]
    assert after == sorted(after, reverse=True)
    assert [s.attack for s in ensemble.stages] == ["apgd-ce", "apgd-t", "square"]


def test_results_do_not_depend_on_the_batch_size(digits_mlp):
    """Each image's random start comes from (seed, index), so the training side and verify
    (other batch sizes, other images left to attack) reach the same verdict per image."""
    model, x, y = digits_mlp
    verdicts = [run_ensemble(model, x, y, EPS, EnsembleConfig(
        attack="apgd-ce", apgd_steps=30, batch_size=size)).robust for size in (7, 96)]
    assert (verdicts[0] == verdicts[1]).all()
    first = apgd(model, x[:5], y[:5], EPS, 30, seed=1, indices=torch.arange(5))
    again = apgd(model, x[3:5], y[3:5], EPS, 30, seed=1, indices=torch.arange(3, 5))
    torch.testing.assert_close(first.x_adv[3:], again.x_adv)


class Quantized(nn.Module):
    """Input rounded to 3 levels before the network: zero gradients almost everywhere, the
    textbook gradient-masking defence that only a black-box attack sees through."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 2) / 2)


def test_sanity_checks_flag_masked_gradients(digits_mlp):
    model, x, y = digits_mlp
    masked = Quantized(model).eval()
    config = EnsembleConfig(apgd_steps=10, target_classes=2, square_queries=300)
    result = run_ensemble(masked, x, y, EPS, config)
    report = run_checks(masked, torch_scorer(masked), x, y, EPS, result)
    assert report.figures["zero_gradient_images"] == len(x)
    assert report.figures["black_box_gain_after_white_box"] > 0.02
    assert report.figures["large_eps"]["robust"] > 0.05
    text = " ".join(report.warnings)
    assert "zero input gradient" in text and "Square broke" in text and "at eps 0.8" in text
    honest = run_checks(model, torch_scorer(model), x, y, EPS,
                        run_ensemble(model, x, y, EPS, config))
    assert honest.warnings == [], honest.warnings


@pytest.mark.slow
def test_as_strong_as_an_independent_autoattack_on_a_trained_default_run(tmp_path):
    """On an adversarially trained checkpoint of the embedded default, our white-box stages
    (APGD-CE then APGD-T, 100 steps, 9 targets) leave at most 1 point more robust accuracy
    than torchattacks' port of the authors' code at the same, original settings (its
    AutoAttack wrapper defaults to 10 steps, which is why both are built by hand here)."""
    import torchattacks

    from dnr_deploy import CompressConfig, compress
    from dnr_deploy.compress.checkpoint import load_checkpoint
    from dnr_deploy.models import create_model

    run = compress(CompressConfig(epochs=6, robust_eval_samples=8, out=str(tmp_path / "run")))
    summary = run.summary
    model = create_model("small", 10, 1, summary["mean"], summary["std"])
    model.load_state_dict(load_checkpoint(run.dir)["model"])
    model.eval()
    x, y = first_test_images(load_data("digits", None), None)
    ours = [run_ensemble(model, x, y, EPS, EnsembleConfig(attack=name)).robust
            for name in ("apgd-ce", "apgd-t")]  # per image, sequential = both applied to all
    our_robust = float((ours[0] & ours[1]).mean())
    independent = torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce",
                          seed=0),
        torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, n_classes=10,
                           seed=0)])
    x_theirs = torch.cat([independent(x[b:b + 120], y[b:b + 120]) for b in range(0, len(x), 120)])
    assert (x_theirs - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        their_robust = float((model(x_theirs).argmax(1) == y).float().mean())
    assert 0.05 < their_robust < 0.95  # a checkpoint where attack strength shows
    assert our_robust <= their_robust + 0.01, (our_robust, their_robust)
