"""Signs that a robust-accuracy figure cannot be trusted (after auto-attack's `checks.py`):
gradient masking shows as zero input gradients, a black-box attack that beats the white-box
ones, or accuracy that does not fall to about zero when eps is made large; a model whose
output is random or is a probability vector fools gradient attacks in other ways.

Each check returns a figure for the report and, when it trips, a warning line that names the
symptom and what to try. None of them stops an evaluation: a warning is a reason to look.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dnr_deploy.attacks.ensemble import AttackName, EnsembleConfig, EnsembleResult, run_ensemble
from dnr_deploy.attacks.pgd import Classifier
from dnr_deploy.attacks.square import QueryFn

# Square may break this fraction of all images after the white-box ones: AutoAttack's
# `check_square_sr` (alpha=.002, fra31/auto-attack `autoattack/checks.py`)
BLACK_BOX_MARGIN = 0.002
LARGE_EPS_FACTOR = 4.0  # the "large eps" of the saturation check, in multiples of the threat's
LARGE_EPS_CEILING = 0.05  # robust accuracy above this at the large eps is suspicious
LARGE_EPS_IMAGES = 200  # images the saturation check attacks (APGD-CE, 20 steps)


@dataclass
class SanityReport:
    """The figures of every check, and the warnings of those that tripped."""

    figures: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def run_checks(model: Classifier | None, score: QueryFn, x: torch.Tensor, y: torch.Tensor,
               eps: float, result: EnsembleResult) -> SanityReport:
    """Every check that the inputs allow (`model` None: black-box only, no gradient checks)."""
    report = SanityReport()
    _black_box_gain(result, report)
    _randomness(score, x, report)
    _probabilities(score, x, report)
    if model is not None:
        _zero_gradients(model, x, y, report)
        _large_eps(model, score, x, y, eps, report)
    return report


def _black_box_gain(result: EnsembleResult, report: SanityReport) -> None:
    white = [s for s in result.stages if AttackName(s.attack).white_box]
    black = [s for s in result.stages if not AttackName(s.attack).white_box]
    if not (white and black and result.count):
        return
    gain = sum(s.broken for s in black) / result.count
    report.figures["black_box_gain_after_white_box"] = gain
    if gain > BLACK_BOX_MARGIN:
        report.warnings.append(
            f"Square broke {100 * gain:.2f}% of all images after the white-box attacks had "
            f"finished (AutoAttack warns above {100 * BLACK_BOX_MARGIN:g}%): the gradients are "
            "likely masked, so trust the worst case, not a gradient attack alone")


def _randomness(score: QueryFn, x: torch.Tensor, report: SanityReport) -> None:
    sample = x[:32].detach().cpu().numpy().astype(np.float32)
    drift = float(np.abs(score(sample) - score(sample)).max()) if len(sample) else 0.0
    report.figures["repeat_forward_max_abs"] = drift
    if drift > 1e-5:
        report.warnings.append(
            f"the same images gave logits {drift:.3g} apart on two calls: a randomized model "
            "needs Expectation over Transformation attacks, which this evaluation does not run")


def _probabilities(score: QueryFn, x: torch.Tensor, report: SanityReport) -> None:
    rows = score(x[:32].detach().cpu().numpy().astype(np.float32)).astype(np.float64)
    softmax_like = bool(rows.size and rows.min() >= 0 and rows.max() <= 1
                        and np.allclose(rows.sum(1), 1, atol=1e-3))
    report.figures["outputs_sum_to_one"] = softmax_like
    if softmax_like:
        report.warnings.append(
            "the model outputs probabilities (rows sum to 1), not logits: cross-entropy on "
            "softmax outputs flattens the gradients; export the network without its softmax")


def _zero_gradients(model: Classifier, x: torch.Tensor, y: torch.Tensor,
                    report: SanityReport) -> None:
    zero = 0
    for begin in range(0, len(x), 256):
        xb = x[begin:begin + 256].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), y[begin:begin + 256], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
        zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
    report.figures["zero_gradient_images"] = zero
    if zero:
        report.warnings.append(
            f"{zero} of {len(x)} images have an all-zero input gradient: gradient attacks "
            "cannot move them (gradient masking?); Square is the cross-check")


def _large_eps(model: Classifier, score: QueryFn, x: torch.Tensor, y: torch.Tensor, eps: float,
               report: SanityReport) -> None:
    large = min(1.0, LARGE_EPS_FACTOR * eps)
    count = min(len(x), LARGE_EPS_IMAGES)
    found = run_ensemble(model, x[:count], y[:count], large,
                         EnsembleConfig(attack=AttackName.APGD_CE.value, apgd_steps=20),
                         score=score)
    report.figures["large_eps"] = {"eps": large, "images": count, "attack": "apgd-ce, 20 steps",
                                   "robust": found.robust_accuracy}
    if found.robust_accuracy > LARGE_EPS_CEILING:
        report.warnings.append(
            f"at eps {large:.3g} ({LARGE_EPS_FACTOR:g}x the threat model) robust accuracy is "
            f"still {100 * found.robust_accuracy:.1f}%: an unbounded attack should reach about "
            "0, so the gradients may be masked")
