"""Auto-PGD (Croce & Hein, ICML 2020), L-infinity: APGD-CE and APGD-T with the targeted DLR loss.

Written here rather than taken from a library because verify attacks two functions at once:
gradients come from the ONNX graph re-imported into torch, while every candidate is scored by
ONNX Runtime, and the random start of each image must come from (seed, image index) alone so
that the training side and verify, with any batch size, start from the same points. The
adversarial-robustness-toolbox and torchattacks ports wrap one torch module and draw their
starts from a global generator. The algorithm follows the paper and the authors' reference code
(fra31/auto-attack, `autopgd_base.py`):

- step size 2 * eps; a heavy-ball step `x + 0.75 (z - x) + 0.25 (x - x_prev)` after the first;
- checkpoints after 22% of the budget, then at intervals shrinking by 3% down to 6%;
- at a checkpoint, an image whose loss rose in at most 75% of the steps since the last one, or
  whose best loss did not improve while its step was not just halved, halves its step and
  restarts from its best point.

Two deliberate differences, neither of which changes any image's trajectory: an image stops
being attacked once it is misclassified (the images are independent in eval mode, and only
success matters), and the first checkpoint compares the first step with the start's loss (the
reference compares it with a zero-filled row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dnr_deploy.attacks.pgd import Classifier, seeded_start_at

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor,
                       _target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image cross-entropy: APGD-CE's loss."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor,
                      target: torch.Tensor | None) -> torch.Tensor:
    """Targeted Difference of Logits Ratio: -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2).

    Scale-invariant in the logits, so a network cannot escape it by inflating them (what
    makes cross-entropy attacks look weak on some defences). Needs at least 4 classes.
    """
    ordered = logits.sort(dim=1).values
    rows = torch.arange(len(y), device=logits.device)
    spread = ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12
    return -(logits[rows, y] - logits[rows, target]) / spread


@dataclass
class ApgdResult:
    """Per image: the adversarial image (the misclassified iterate where one was found, else
    the highest-loss point) and whether the attacked model misclassified it."""

    x_adv: torch.Tensor
    fooled: torch.Tensor


def checkpoints(steps: int) -> list[int]:
    """The iterations (1-based counts) after which APGD checks its step size."""
    first, minimum, decrease = (max(int(f * steps), 1) for f in (0.22, 0.06, 0.03))
    marks, interval, at = [], first, 0
    while at + interval <= steps:
        at += interval
        marks.append(at)
        interval = max(interval - decrease, minimum)
    return marks


def apgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    target: torch.Tensor | None = None,
    seed: int = 0,
    indices: torch.Tensor | None = None,
) -> ApgdResult:
    """One run of APGD on a batch: cross-entropy when `target` is None, else targeted DLR.

    Args:
        model: images in [0, 1] -> logits; its train/eval mode is left as found.
        x, y: clean images (NCHW, [0, 1]) and labels.
        eps: L-infinity radius in pixel units.
        steps: iterations (AutoAttack: 100).
        target: per-image target classes for APGD-T.
        seed, indices: the random start of image i is drawn from (seed, indices[i]).
    """
    x = x.detach()
    indices = torch.arange(len(x)) if indices is None else indices
    noise = seeded_start_at(x, 1.0, seed, indices.tolist())
    # the reference scales each image's uniform noise so its largest entry is exactly eps
    scale = noise.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    loss_fn: LossFn = cross_entropy_loss if target is None else dlr_targeted_loss
    state = _State(x, y, target, eps, (x + eps * noise / scale).clamp(0.0, 1.0))
    state.evaluate(model, loss_fn, torch.arange(len(x), device=x.device), first=True)
    marks = set(checkpoints(steps))
    last_mark = 0
    for step in range(1, steps + 1):
        active = (~state.fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        state.move(active, heavy_ball=step > 1)
        state.evaluate(model, loss_fn, active, first=False)
        state.history.append(state.loss.clone())
        if step in marks:
            state.adapt_steps(active, step - last_mark)
            last_mark = step
    chosen = torch.where(state.fooled.view(-1, *[1] * (x.dim() - 1)), state.x_fooled,
                         state.x_best)
    return ApgdResult(chosen.detach(), state.fooled.clone())


class _State:
    """Per-image tensors of one APGD run (full batch; updates touch the active rows only)."""

    def __init__(self, x, y, target, eps: float, x_start: torch.Tensor) -> None:
        self.x, self.y, self.target, self.eps = x, y, target, eps
        n = len(x)
        self.x_adv = x_start
        self.x_prev = x_start.clone()
        self.x_best = x_start.clone()
        self.x_fooled = x_start.clone()
        self.grad = torch.zeros_like(x)
        self.grad_best = torch.zeros_like(x)
        self.loss = torch.zeros(n, device=x.device)
        self.loss_best = torch.full((n,), -torch.inf, device=x.device)
        self.fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.step = torch.full((n, *[1] * (x.dim() - 1)), 2.0 * eps, device=x.device)
        self.history: list[torch.Tensor] = []
        self.best_at_last_mark = self.loss_best.clone()
        self.halved_at_last_mark = torch.ones(n, dtype=torch.bool, device=x.device)

    def project(self, candidate: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        x = self.x[rows]
        return torch.min(torch.max(candidate, x - self.eps), x + self.eps).clamp(0.0, 1.0)

    def move(self, rows: torch.Tensor, heavy_ball: bool) -> None:
        """One projected sign-gradient step with momentum for the images in `rows`."""
        with torch.no_grad():
            current, previous = self.x_adv[rows], self.x_prev[rows]
            z = self.project(current + self.step[rows] * self.grad[rows].sign(), rows)
            alpha = 0.75 if heavy_ball else 1.0
            moved = current + alpha * (z - current) + (1 - alpha) * (current - previous)
            self.x_prev[rows] = current
            self.x_adv[rows] = self.project(moved, rows)

    def evaluate(self, model: Classifier, loss_fn: LossFn, rows: torch.Tensor,
                 first: bool) -> None:
        """Loss, gradient and success at the current points of `rows`; best points kept."""
        x_rows = self.x_adv[rows].clone().requires_grad_(True)
        target = None if self.target is None else self.target[rows]
        with torch.enable_grad():
            logits = model(x_rows)
            loss = loss_fn(logits, self.y[rows], target)
            (grad,) = torch.autograd.grad(loss.sum(), x_rows)
        with torch.no_grad():
            loss = loss.detach()
            self.grad[rows] = grad
            self.loss[rows] = loss
            fooled = logits.argmax(1) != self.y[rows]
            self.x_fooled[rows[fooled]] = x_rows.detach()[fooled]
            self.fooled[rows] |= fooled
            better = loss > self.loss_best[rows]
            if first:
                better[:] = True
            improved = rows[better]
            self.x_best[improved] = self.x_adv[improved]
            self.grad_best[improved] = grad[better]
            self.loss_best[improved] = loss[better]
            if first:
                self.history.append(loss.new_zeros(len(self.x)).index_copy(0, rows, loss))
                self.best_at_last_mark = self.loss_best.clone()

    def adapt_steps(self, rows: torch.Tensor, interval: int) -> None:
        """The checkpoint rule: halve the step, and restart from the best point, where the
        loss rose too rarely or the best loss stalled without a halving last time."""
        losses = torch.stack(self.history[-(interval + 1):])[:, rows]
        rises = (losses[1:] > losses[:-1]).sum(0)
        oscillating = rises <= 0.75 * interval
        stalled = ~self.halved_at_last_mark[rows] & (
            self.best_at_last_mark[rows] >= self.loss_best[rows])
        halve = oscillating | stalled
        self.halved_at_last_mark[rows] = halve
        self.best_at_last_mark[rows] = self.loss_best[rows]
        chosen = rows[halve]
        self.step[chosen] /= 2.0
        self.x_adv[chosen] = self.x_best[chosen]
        self.grad[chosen] = self.grad_best[chosen]
