"""When DNR rewires and how much: a pure function of the optimizer step, so the schedule means
the same on 23 steps an epoch (the embedded default) as on 391 (CIFAR at batch 128).

Worked example: every 50 steps, initial prune fraction 0.3, topology frozen after 75% of
training. A 460-step run rewires after steps 50, 100, ..., 300 (345 = 0.75 * 460 is the
freeze point), pruning 0.3 * (1 + cos(pi * step / 345)) / 2 of each layer's active weights:
0.29 at step 50, 0.15 at step 172, 0.02 at step 300. A resumed run recomputes the same numbers
from the step count alone (RigL, Evci et al. 2020, uses the same cosine-to-zero schedule and
freeze point; Dettmers & Zettlemoyer 2019 rewire once an epoch, which on 23-step epochs
replaces half of every layer every 23 steps: the churn that collapsed training at 2%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RewireSchedule:
    """Rewire every `every` optimizer steps until `until` of training, pruning a fraction of
    each layer's active weights that decays by a cosine from `initial` to 0."""

    every: int
    initial: float
    until: float

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"rewire_every must be at least 1 step, got {self.every}")
        if not 0.0 < self.initial < 1.0:
            raise ValueError(f"prune_rate must be in (0, 1), got {self.initial}")
        if not 0.0 <= self.until <= 1.0:
            raise ValueError(f"rewire_until must be in [0, 1], got {self.until}")

    def rate_at(self, step: int, total_steps: int) -> float | None:
        """The prune fraction of the rewire after optimizer step `step` (1-based) of
        `total_steps`, or None when no rewire follows that step."""
        frozen_after = self.until * total_steps
        if step % self.every or step >= frozen_after:
            return None
        return 0.5 * self.initial * (1.0 + math.cos(math.pi * step / frozen_after))

    def rewires(self, total_steps: int) -> int:
        """How many rewires a run of `total_steps` gets."""
        return sum(self.rate_at(s, total_steps) is not None
                   for s in range(self.every, total_steps + 1, self.every))

    def progress(self, step: int, total_steps: int) -> float:
        """How much of the rewiring is done after the rewire that follows `step`: k / K for the
        k-th of K rewires (1.0 at the last), which a density schedule decays along."""
        total = self.rewires(total_steps)
        return min((step // self.every) / total, 1.0) if total else 1.0


def cubic_density(start: float | None, target: float, progress: float) -> float:
    """The density a rewire ends at when masks start at `start` (None: at the target): a cubic
    from the start to the target over the rewires (Zhu & Gupta 2017), fast early, gentle late,
    exactly the target once `progress` reaches 1."""
    if start is None:
        return target
    return target + (start - target) * (1.0 - progress) ** 3
