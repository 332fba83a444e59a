"""Square Attack (Andriushchenko et al., ECCV 2020), L-infinity, score-based.

It only queries a function that returns logits (here: an ONNX Runtime session), never a
gradient, so it is verify's cross-check for gradient masking: if this black-box attack gets
robust accuracy well below white-box PGD's, the gradients PGD followed were misleading.

The algorithm follows the paper's Algorithm 1 and the authors' reference code
(github.com/max-andr/square-attack, `square_attack_linf`): vertical-stripe initialisation at
+-eps; at each iteration every not-yet-fooled image gets a random square window whose values
are set to x +- eps (one sign per channel), resampled until the window changes the image; the
change is kept when the margin loss falls. The square's area is the fraction p of the image,
with p halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a 10,000-query
budget (rescaled for other budgets). The default p_init 0.8 is AutoAttack's choice for
L-infinity (the paper used 0.05 on ImageNet); it suits small images, where the window is only a
few pixels wide anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QueryFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW in [0, 1] -> logits

# The paper's schedule: (iteration out of 10,000, divisor of p_init from there on).
_P_SCHEDULE = ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
               (200, 8), (50, 4), (10, 2))
_MAX_RESAMPLES = 100  # a window that changes nothing is re-drawn; this bounds the loop


@dataclass
class SquareResult:
    """The adversarial images and how many queries each one took."""

    x_adv: np.ndarray
    queries: np.ndarray  # per image, including the clean query
    margin: np.ndarray  # final margin loss; <= 0 means misclassified


def p_selection(p_init: float, iteration: int, n_iters: int) -> float:
    """Fraction of the image a square covers at `iteration` (the paper's piecewise schedule)."""
    scaled = int(iteration / n_iters * 10000)
    for start, divisor in _P_SCHEDULE:
        if scaled > start:
            return p_init / divisor
    return p_init


def margin_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """logit of the true class minus the largest other logit (negative: misclassified)."""
    true = logits[np.arange(len(y)), y]
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    return true - others.max(axis=1)


def square_attack(
    query: QueryFn, x: np.ndarray, y: np.ndarray, eps: float, n_queries: int = 5000,
    p_init: float = 0.8, seed: int = 0, progress: Callable[[str], None] | None = None,
) -> SquareResult:
    """Untargeted L-infinity Square Attack on a batch.

    Images already misclassified clean are left as they are (one query each); the others are
    attacked until misclassified or out of queries.

    Args:
        query: maps float32 NCHW images in [0, 1] to logits (numpy).
        x: clean images, float32 NCHW in [0, 1].
        y: integer labels.
        eps: L-infinity radius, in (0, 1].
        n_queries: query budget per image (the clean query included).
        p_init: initial fraction of the image one square covers.
        seed: seed of the attack's own generator.
        progress: called with a short line every 250 queries (a long attack is not silent).

    Raises:
        ValueError: eps outside (0, 1], a budget below 2 queries, or p_init outside (0, 1].
    """
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if n_queries < 2:
        raise ValueError(f"n_queries must be at least 2, got {n_queries}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    eps32 = np.float32(eps)
    margin = margin_loss(query(x), y)
    queries = np.ones(len(x), dtype=np.int64)
    x_best = x.copy()

    attack = np.flatnonzero(margin > 0)
    if attack.size:
        _, c, _, w = x.shape
        stripes = rng.choice([-eps32, eps32], size=(attack.size, c, 1, w)).astype(np.float32)
        x_best[attack] = np.clip(x[attack] + stripes, 0.0, 1.0)
        margin[attack] = margin_loss(query(x_best[attack]), y[attack])
        queries[attack] += 1
    for iteration in range(n_queries - 2):
        todo = np.flatnonzero(margin > 0)
        if todo.size == 0:
            break
        if progress and iteration % 250 == 249:
            progress(f"{iteration + 2}/{n_queries} queries, {todo.size}/{len(x)} images left")
        x_new = _propose(x[todo], x_best[todo], eps32, p_selection(p_init, iteration, n_queries),
                         rng)
        candidate = margin_loss(query(x_new), y[todo])
        queries[todo] += 1
        better = candidate < margin[todo]
        x_best[todo[better]] = x_new[better]
        margin[todo[better]] = candidate[better]
    return SquareResult(x_best, queries, margin)


def _propose(x: np.ndarray, x_best: np.ndarray, eps: np.float32, p: float,
             rng: np.random.Generator) -> np.ndarray:
    """x_best with one random square per image set to x +- eps (one sign per channel)."""
    n, c, h, w = x.shape
    side = int(round(np.sqrt(p * h * w)))
    side = min(max(side, 1), min(h, w) - 1)
    # every position, the last row and column included (the reference code's
    # randint(0, h - s) never places a square there: a visible gap on 8x8 images)
    top = rng.integers(0, h - side + 1, size=n)
    left = rng.integers(0, w - side + 1, size=n)
    rows, cols = np.arange(h), np.arange(w)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    window = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # n, 1, h, w
    delta = x_best - x
    pending = np.ones(n, dtype=bool)
    for _ in range(_MAX_RESAMPLES):
        signs = rng.choice([-eps, eps], size=(int(pending.sum()), c, 1, 1)).astype(np.float32)
        delta[pending] = np.where(window[pending], signs, delta[pending])
        moved = np.abs(np.clip(x + delta, 0.0, 1.0) - x_best) >= 1e-7
        pending = ~(moved & window).any(axis=(1, 2, 3))
        if not pending.any():
            break
    return np.clip(x + delta, 0.0, 1.0).astype(np.float32)
