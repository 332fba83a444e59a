"""L-infinity FGSM and PGD in [0, 1] pixel space. They take any callable that maps images to
logits (a torch module, or an ONNX graph re-imported into torch), so verify can reuse them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


def seeded_start(x: torch.Tensor, eps: float, seed: int, first_index: int) -> torch.Tensor:
    """A random start in the eps ball for each image, drawn from (seed, image index) alone.

    Evaluation uses it so that two evaluations of the same images (training-side, and verify
    on the exported artifact, with any batch size) start PGD from the same points and differ
    only where the two functions do.
    """
    return seeded_start_at(x, eps, seed, range(first_index, first_index + len(x)))


def seeded_start_at(x: torch.Tensor, eps: float, seed: int, indices: Iterable[int]
                    ) -> torch.Tensor:
    """`seeded_start` for images at arbitrary indices of the evaluated set (an ensemble attacks
    only the images still robust, so a batch's indices are not contiguous)."""
    starts = torch.empty_like(x, device="cpu")
    for offset, index in enumerate(indices):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(index))
        starts[offset].uniform_(-eps, eps, generator=generator)
    return starts.to(x.device)


def pgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on cross-entropy inside the eps ball (Madry et al. 2018).

    The random start draws from the global RNG unless `start` (a perturbation, e.g. from
    `seeded_start`) is given. The model's train/eval mode is the caller's choice and is left
    as found; parameters get no gradients from the attack.
    """
    x = x.detach()
    x_adv = x.clone()
    if start is not None:
        x_adv = (x_adv + start).clamp_(0.0, 1.0)
    elif random_start:
        x_adv = (x_adv + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()
