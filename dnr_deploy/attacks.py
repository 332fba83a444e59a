"""L-infinity FGSM and PGD in [0, 1] pixel space. They take any callable that maps images to
logits (a torch module, or an ONNX graph re-imported into torch), so verify can reuse them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Classifier = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ThreatModel:
    """An L-infinity ball of radius eps around each image, clipped to [0, 1]."""

    eps: float
    norm: str = "Linf"


def fgsm(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, random_start=False)


def pgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """Projected gradient ascent on cross-entropy inside the eps ball (Madry et al. 2018).

    The model's train/eval mode is the caller's choice and is left as found; parameters get no
    gradients from the attack.
    """
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = (x_adv + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()
