"""Square Attack (Andriushchenko et al., ECCV 2020), L-infinity, score-based.

It only queries a function that returns logits (here: an ONNX Runtime session), never a
gradient, so it is verify's cross-check for gradient masking: if this black-box attack gets
robust accuracy well below white-box PGD's, the gradients PGD followed were misleading.

Reference: AutoAttack's "standard" version (fra31/auto-attack, `autoattack/square.py`,
`SquareAttack.attack_single_run`, Linf branch, as `autoattack.py` configures it: p_init 0.8,
n_queries 5000, one restart, margin loss, `resc_schedule=False`). Followed exactly:

- start: vertical stripes, x + eps * sign per (channel, column), clipped to [0, 1];
- `n_queries` iterations after that start (the clean query and the start's come on top);
- each iteration every not-yet-fooled image gets one square whose pixels are set to x +- eps
  (one sign per channel); the change is kept when the margin loss falls, and an image stops
  once misclassified;
- the square covers the fraction p of the image, side `round(sqrt(p * h * w))` (at least 1),
  with p = p_init halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (the
  paper's schedule for 10,000 queries). AutoAttack's standard version does NOT rescale these
  iteration counts to the budget (`resc_schedule=False`; torchattacks' port defaults to
  rescaling), so with 5,000 queries p ends at p_init / 128, and a smaller budget simply stops
  earlier in the same schedule.

Three deliberate differences; none makes the attack weaker:

- Randomness per image: the reference draws ONE square position and ONE set of signs per
  iteration for the whole batch (a shared `torch.rand`), so an image's trajectory depends on
  the batch it is in. Here image i draws from its own generator, seeded by (seed, index of the
  image in the evaluated set), the way APGD's random starts are: the training side (batches
  of 256) and verify (128) give every image the same trajectory. Per-image squares are also
  what the authors' original code does (max-andr/square-attack, `square_attack_linf`).
- Square positions include the last row and column: the reference's `random_int(0, h - s)`
  never places a square there, which on 8x8 images leaves 15 of 64 pixels out of reach once
  squares are one pixel wide. The position is drawn the reference's way otherwise
  (floor of a uniform draw times the number of positions).
- A candidate equal to the current best image (the square changed nothing) is not sent to the
  model: the reference queries it, gets the same margin and keeps the old image, so the
  outcome is the same and only time is saved. `queries` counts the queries actually made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

QueryFn = Callable[[np.ndarray], np.ndarray]  # float32 NCHW in [0, 1] -> logits

# AutoAttack's schedule: (iteration, divisor of p_init after it), not rescaled to the budget.
_P_SCHEDULE = ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
               (200, 8), (50, 4), (10, 2))
_DRAW_CHUNK = 256  # iterations of random numbers drawn per image at a time (bounds memory)
_UINT64 = (1 << 64) - 1


@dataclass
class SquareResult:
    """The adversarial images and how many queries each one took."""

    x_adv: np.ndarray
    queries: np.ndarray  # per image, the clean query included
    margin: np.ndarray  # final margin loss; <= 0 means misclassified


def p_selection(p_init: float, iteration: int) -> float:
    """Fraction of the image a square covers at `iteration` (0-based, counted after the
    stripe start), exactly AutoAttack's `p_selection` with `resc_schedule=False`."""
    for start, divisor in _P_SCHEDULE:
        if iteration > start:
            return p_init / divisor
    return p_init


def margin_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """logit of the true class minus the largest other logit (negative: misclassified)."""
    true = logits[np.arange(len(y)), y]
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    return true - others.max(axis=1)


def image_generator(seed: int, index: int) -> np.random.Generator:
    """The generator of one image's Square draws: (seed, image index) alone, like APGD's starts."""
    return np.random.default_rng([int(seed) & _UINT64, int(index) & _UINT64])


def square_attack(
    query: QueryFn, x: np.ndarray, y: np.ndarray, eps: float, n_queries: int = 5000,
    p_init: float = 0.8, seed: int = 0, indices: Sequence[int] | np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> SquareResult:
    """Untargeted L-infinity Square Attack on a batch.

    Images already misclassified clean are left as they are (one query each); the others are
    attacked until misclassified or out of iterations.

    Args:
        query: maps float32 NCHW images in [0, 1] to logits (numpy).
        x: clean images, float32 NCHW in [0, 1].
        y: integer labels.
        eps: L-infinity radius, in (0, 1].
        n_queries: iterations after the stripe start (AutoAttack's `n_queries`).
        p_init: initial fraction of the image one square covers.
        seed, indices: image i draws from (seed, indices[i]); indices default to 0..n-1.
        progress: called with a short line every 250 iterations (a long attack is not silent).

    Raises:
        ValueError: eps outside (0, 1], a budget below 1, p_init outside (0, 1], or indices
            of the wrong length.
    """
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if n_queries < 1:
        raise ValueError(f"n_queries must be at least 1, got {n_queries}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    indices = np.arange(len(x)) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.shape != (len(x),):
        raise ValueError(f"indices must have one entry per image ({len(x)}), got {indices.shape}")
    eps32 = np.float32(eps)
    margin = margin_loss(query(x), y)
    queries = np.ones(len(x), dtype=np.int64)
    x_best = x.copy()
    attack = np.flatnonzero(margin > 0)
    if attack.size == 0:
        return SquareResult(x_best, queries, margin)

    _, c, h, w = x.shape
    generators = [image_generator(seed, indices[i]) for i in attack]
    stripes = np.stack([g.random((c, 1, w)) for g in generators])
    x_best[attack] = np.clip(x[attack] + _signs(stripes, eps32), 0.0, 1.0)
    margin[attack] = margin_loss(query(x_best[attack]), y[attack])
    queries[attack] += 1
    slot = np.full(len(x), -1)
    slot[attack] = np.arange(attack.size)  # image -> its row of `draws`
    draws = np.empty((attack.size, 0, 2 + c))
    for iteration in range(n_queries):
        todo = np.flatnonzero(margin > 0)
        if todo.size == 0:
            break
        if progress and iteration % 250 == 249:
            progress(f"{iteration + 1}/{n_queries} iterations, {todo.size}/{len(x)} images left")
        if iteration % _DRAW_CHUNK == 0:  # each image's stream, whatever its batch
            draws = np.stack([g.random((_DRAW_CHUNK, 2 + c)) for g in generators])
        drawn = draws[slot[todo], iteration % _DRAW_CHUNK]
        x_new = _propose(x[todo], x_best[todo], eps32, p_selection(p_init, iteration), drawn)
        changed = (x_new != x_best[todo]).reshape(todo.size, -1).any(axis=1)
        sent, x_sent = todo[changed], x_new[changed]
        if sent.size == 0:
            continue
        candidate = margin_loss(query(x_sent), y[sent])
        queries[sent] += 1
        better = candidate < margin[sent]
        x_best[sent[better]] = x_sent[better]
        margin[sent[better]] = candidate[better]
    return SquareResult(x_best, queries, margin)


def _signs(uniform: np.ndarray, eps: np.float32) -> np.ndarray:
    """+-eps from uniform draws (the reference's sign(2u - 1); u < 0.5 is negative)."""
    return np.where(uniform < 0.5, -eps, eps).astype(np.float32)


def _propose(x: np.ndarray, x_best: np.ndarray, eps: np.float32, p: float,
             drawn: np.ndarray) -> np.ndarray:
    """x_best with one square per image set to x +- eps (one sign per channel).

    `drawn` holds each image's uniform draws for this iteration: row position, column
    position, then one per channel for the signs.
    """
    n, c, h, w = x.shape
    side = min(max(int(round(np.sqrt(p * h * w))), 1), h, w)
    top = np.floor(drawn[:, 0] * (h - side + 1)).astype(np.int64)
    left = np.floor(drawn[:, 1] * (w - side + 1)).astype(np.int64)
    rows, cols = np.arange(h), np.arange(w)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    window = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # n, 1, h, w
    corner = np.clip(x + _signs(drawn[:, 2:], eps)[:, :, None, None], 0.0, 1.0)
    return np.where(window, corner, x_best).astype(np.float32)
