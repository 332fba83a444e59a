"""Accuracy under attack: the per-epoch check and the final robustness report of a run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dnr_deploy.attacks import (
    EnsembleConfig,
    fgsm,
    pgd,
    run_ensemble,
    seeded_start,
    torch_scorer,
)
from dnr_deploy.attacks.checks import run_checks
from dnr_deploy.attacks.ensemble import Progress

# re-exported: the stages import progress from here or, where torch must not load, from progress
from dnr_deploy.progress import progress_silenced, silence_progress, terminal_progress  # noqa: F401

# (model, images, labels, index of the first image in the evaluated set) -> adversarial images
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]
EVAL_SEED = 0  # PGD-20's random starts; dnr-verify's default --seed draws the same ones


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: dict[str, Attack],
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy on (x, y) clean (key "clean") and under each named attack, in eval mode."""
    was_training = model.training
    model.eval()
    correct = dict.fromkeys(["clean", *attacks], 0)
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            with torch.no_grad():
                correct["clean"] += int((model(xb).argmax(1) == yb).sum())
            for name, attack in attacks.items():
                x_adv = attack(model, xb, yb, start)
                with torch.no_grad():
                    correct[name] += int((model(x_adv).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {name: count / len(x) for name, count in correct.items()}


def final_attacks(eps: float, pgd7_step_size: float) -> dict[str, Attack]:
    """The paper's evaluation: FGSM, PGD-7 at its fixed step (0.01 at eps 8/255), plus the
    stronger PGD-20 at step eps/4 from a random start seeded per image (EVAL_SEED), which
    dnr-verify reproduces on the exported artifact."""
    return {
        "fgsm": lambda m, x, y, _i: fgsm(m, x, y, eps),
        "pgd7": lambda m, x, y, _i: pgd(m, x, y, eps, pgd7_step_size, 7, random_start=True),
        "pgd20": lambda m, x, y, i: pgd(m, x, y, eps, eps / 4, 20,
                                        start=seeded_start(x, eps, EVAL_SEED, i)),
    }


def robust_evaluation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      device: torch.device, config: EnsembleConfig | None = None,
                      progress: Progress | None = None) -> dict:
    """The AutoAttack-grade ensemble and its sanity checks on (x, y): run.json's "robustness".

    Its "robust" figure is what `accuracy.autoattack` records and what dnr-verify's gate
    compares the deployed artifact with (same images, same seeds, same budgets).
    """
    config = config or EnsembleConfig()
    was_training = model.training
    model.eval()
    try:
        x, y = x.to(device), y.to(device)
        result = run_ensemble(model, x, y, eps, config, progress=progress)
        checks = run_checks(model, torch_scorer(model, config.batch_size), x, y, eps, result)
    finally:
        model.train(was_training)
    return {"protocol": protocol(config), "threat_model": {"norm": "Linf", "eps": eps},
            **result.as_dict(), "checks": checks.figures, "warnings": checks.warnings}


def protocol(config: EnsembleConfig) -> dict:
    """What ran, for run.json, the manifest and verify.json: enough to repeat it exactly."""
    return {"attack": config.attack, "apgd_steps": config.apgd_steps,
            "restarts": config.restarts, "target_classes": config.target_classes,
            "square_queries": config.square_queries, "square_p_init": config.square_p_init,
            "seed": config.seed}

