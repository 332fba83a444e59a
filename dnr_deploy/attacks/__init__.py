"""Attacks in [0, 1] pixel space on any callable that maps images to logits: FGSM and PGD (the
training attack), APGD-CE / APGD-T, Square, and the AutoAttack-grade ensemble that every robust
figure of the project is measured with."""

from dnr_deploy.attacks.apgd import ApgdResult, apgd, dlr_targeted_loss
from dnr_deploy.attacks.ensemble import (
    AttackName,
    EnsembleConfig,
    EnsembleResult,
    Stage,
    run_ensemble,
    torch_scorer,
)
from dnr_deploy.attacks.pgd import Classifier, ThreatModel, fgsm, pgd, seeded_start, seeded_start_at
from dnr_deploy.attacks.square import SquareResult, margin_loss, square_attack

__all__ = [
    "ApgdResult", "AttackName", "Classifier", "EnsembleConfig", "EnsembleResult", "Stage",
    "SquareResult", "ThreatModel", "apgd", "dlr_targeted_loss", "fgsm", "margin_loss", "pgd",
    "run_ensemble", "seeded_start", "seeded_start_at", "square_attack", "torch_scorer",
]
