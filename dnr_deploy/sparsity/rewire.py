"""The DNR rewiring step for single weights: prune by magnitude, regrow by momentum.

Worked example with two layers, prune fraction 0.5 and 4 active weights each: each layer drops its
2 smallest-magnitude active weights (4 freed in all). Layer A's active weights carry mean
|momentum| 0.3 and layer B's 0.1, so the normalized momentum is (0.75, 0.25) and A regrows 3
weights, B 1, each at its inactive positions with the largest |momentum|. 8 active before, 8
after: a rewire moves weights between and within layers, never changes their number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from dnr_deploy.sparsity.masks import Masks, split_budget


class Redistribution(str, Enum):
    """How the freed budget is split across layers at a rewire."""

    MOMENTUM = "momentum"  # by each layer's total |momentum| over its active weights
    MEAN = "mean"  # by mean |momentum| (Dettmers & Zettlemoyer 2019; starves large layers)
    NONE = "none"  # each layer regrows what it pruned


@dataclass(frozen=True)
class RewireSchedule:
    """When to rewire and how much, in optimizer steps and fractions of training.

    Rewire after step `s` (1-based, global) when `s % every == 0` and `s < until * total`; the
    prune fraction decays by a cosine from `initial` at step 0 to 0 at `until * total`, after
    which the topology is frozen (RigL, Evci et al. 2020). Example: every 50, initial 0.3, until
    0.75, 460 steps (20 epochs of 23): rewires after steps 50, 100, ..., 300 with fractions
    0.29, 0.26, ..., 0.02. A pure function of the counters, so resume reproduces it.
    """

    every: int = 50
    initial: float = 0.3
    until: float = 0.75

    def due(self, step: int, total_steps: int) -> bool:
        return step > 0 and step % self.every == 0 and step < self.until * total_steps

    def fraction(self, step: int, total_steps: int) -> float:
        return prune_rate(step, total_steps, self.initial, self.until)


def prune_rate(step: int, total_steps: int, initial: float = 0.3, until: float = 0.75) -> float:
    """Fraction of active weights each layer drops at a rewire after global step `step`:
    cosine from `initial` at step 0 to 0 at `until * total_steps` (and 0 after)."""
    end = max(until * total_steps, 1.0)
    progress = min(max(step / end, 0.0), 1.0)
    return 0.5 * initial * (1.0 + math.cos(math.pi * progress))


def normalized_momentum(
    momenta: dict[str, torch.Tensor], masks: Masks,
    mode: Redistribution = Redistribution.MOMENTUM,
) -> dict[str, float]:
    """Each layer's share of the momentum over active weights; the shares sum to 1.

    A layer whose weights the loss keeps pushing on is a layer that wants more capacity.
    MOMENTUM sums |momentum| over a layer's active weights, so a layer of twice the weights at
    the same per-weight push gets twice the share (size-aware); MEAN averages it, which gives
    every layer about the same weight count whatever its size (measured: conv4, 61% of the
    weights of `small`, ended at 0.56% density at a 2% target). NONE returns each layer's
    share of active weights. Uniform if every momentum is zero (before the first step).
    """
    values = {}
    for name, mask in masks.items():
        active = momenta[name].abs()[mask]
        if mode is Redistribution.NONE:
            values[name] = float(active.numel())
        elif mode is Redistribution.MEAN:
            values[name] = active.mean().item() if active.numel() else 0.0
        else:
            values[name] = active.sum().item()
    total = sum(values.values())
    if total <= 0:
        return {name: 1.0 / len(values) for name in values}
    return {name: value / total for name, value in values.items()}


def layer_prune_fractions(
    masks: Masks, shares: dict[str, float], fraction: float, dense_above: float = 0.8,
) -> dict[str, float]:
    """`fraction` for every layer, except Dettmers' rule: a layer denser than `dense_above`
    whose share is above average drops at most its fraction of zeros, so a nearly dense layer
    that is still growing is not halved at every rewire (sparse_learning, core.py)."""
    average = 1.0 / len(masks)
    result = {}
    for name, mask in masks.items():
        density = mask.float().mean().item()
        if density > dense_above and shares[name] > average:
            result[name] = min(fraction, 1.0 - density)
        else:
            result[name] = fraction
    return result


def prune_smallest(weight: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask` with its `count` smallest-|weight| active entries switched off."""
    if count <= 0:
        return mask.clone()
    flat_mask = mask.flatten()
    active = flat_mask.nonzero().squeeze(1)
    magnitudes = weight.detach().flatten()[active].abs()
    drop = active[torch.argsort(magnitudes, stable=True)[:count]]
    new_mask = flat_mask.clone()
    new_mask[drop] = False
    return new_mask.view_as(mask)


def regrow_largest(momentum: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask` with its `count` inactive entries of largest |momentum| switched on."""
    if count <= 0:
        return mask.clone()
    flat_mask = mask.flatten()
    inactive = (~flat_mask).nonzero().squeeze(1)
    scores = momentum.detach().flatten()[inactive].abs()
    grow = inactive[torch.argsort(scores, descending=True, stable=True)[:count]]
    new_mask = flat_mask.clone()
    new_mask[grow] = True
    return new_mask.view_as(mask)


def rewire_irregular(
    weights: dict[str, torch.Tensor],
    momenta: dict[str, torch.Tensor],
    masks: Masks,
    fraction: float,
    mode: Redistribution = Redistribution.MOMENTUM,
) -> tuple[Masks, dict[str, float]]:
    """One DNR rewire over all layers; returns the new masks and the momentum shares.

    Shares are measured before pruning, on the weights that were active since the last rewire.
    With NONE each layer regrows exactly what it pruned. Regrowth may pick a position pruned a
    moment ago if its momentum says so.
    """
    shares = normalized_momentum(momenta, masks, mode)
    fractions = layer_prune_fractions(masks, shares, fraction)
    pruned, counts = {}, {}
    for name, mask in masks.items():
        counts[name] = math.floor(fractions[name] * int(mask.sum()))
        pruned[name] = prune_smallest(weights[name], mask, counts[name])
    free_slots = {name: int((~mask).sum()) for name, mask in pruned.items()}
    if mode is Redistribution.NONE:
        regrow_counts = counts
    else:
        regrow_counts = split_budget(sum(counts.values()), shares, free_slots)
    rewired = {
        name: regrow_largest(momenta[name], pruned[name], regrow_counts[name]) for name in masks
    }
    return rewired, shares


def fill_channels(
    masks: dict[str, torch.Tensor],
    candidates: dict[str, list[int]],
    shares: dict[str, float],
    count_params: Callable[[dict[str, torch.Tensor]], int],
    target: int,
) -> dict[str, torch.Tensor]:
    """Switch on channels, best candidate first, until none fits under `target` parameters.

    A channel's cost depends on its neighbours (it adds a filter of `in_active` inputs and an
    input slice to each consumer), so the freed parameter budget is split by `shares` as a
    quota and filled one channel at a time: the group furthest below its quota goes next, and a
    group whose next channel would overshoot `target` is done. The result never exceeds
    `target` and stops within one channel's cost of it.
    """
    masks = {name: mask.clone() for name, mask in masks.items()}
    queues = {name: list(order) for name, order in candidates.items()}
    count = count_params(masks)
    budget = max(target - count, 0)
    spent = dict.fromkeys(masks, 0)
    open_groups = {name for name, queue in queues.items() if queue}
    while open_groups:
        name = max(sorted(open_groups), key=lambda g: shares[g] * budget - spent[g])
        channel = queues[name].pop(0)
        masks[name][channel] = True
        new_count = count_params(masks)
        if new_count > target:
            masks[name][channel] = False
            open_groups.discard(name)
            continue
        spent[name] += new_count - count
        count = new_count
        if not queues[name]:
            open_groups.discard(name)
    return masks


def rewire_channels(
    importance: dict[str, torch.Tensor],
    momentum_rows: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    fraction: float,
    count_params: Callable[[dict[str, torch.Tensor]], int],
    target: int,
    generator: torch.Generator,
    mode: Redistribution = Redistribution.MOMENTUM,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One DNR rewire over channel units (one importance score and momentum row per unit).

    Prune: each group drops the fraction `fraction` of its active units of least importance
    (the caller's score, one that batch norm does not cancel), always keeping one. Regrow: the
    freed parameter budget is split by momentum shares and filled with inactive units by
    momentum norm. An off unit outputs exactly zero and gets no gradient, so its momentum only
    decays: ranked by momentum alone, regrowth would re-enable the units just pruned. So units
    pruned at this rewire go last, and units tied at zero are ordered at random (seeded), which
    lets regrowth explore units that have been off for a while (our choice; the paper is silent).
    """
    row_masks = {g: m.view(-1, 1).expand_as(momentum_rows[g]) for g, m in masks.items()}
    shares = normalized_momentum(momentum_rows, row_masks, mode)
    pruned = {}
    for name, mask in masks.items():
        active = int(mask.sum())
        count = min(math.floor(fraction * active), active - 1)
        pruned[name] = prune_smallest(importance[name], mask, count)
    candidates = {}
    for name, mask in pruned.items():
        scores = momentum_rows[name].norm(dim=1)
        scores = torch.where(masks[name] & ~mask, torch.full_like(scores, -1.0), scores)
        shuffle = torch.randperm(mask.numel(), generator=generator)
        order = shuffle[torch.argsort(scores[shuffle], descending=True, stable=True)]
        candidates[name] = [int(i) for i in order if not mask[i]]
    if mode is Redistribution.NONE:
        shares = {name: int(m.sum()) - int(pruned[name].sum()) for name, m in masks.items()}
        total = sum(shares.values()) or 1
        shares = {name: v / total for name, v in shares.items()}
    return fill_channels(pruned, candidates, shares, count_params, target), shares


def random_channel_masks(
    sizes: dict[str, int],
    count_params: Callable[[dict[str, torch.Tensor]], int],
    target: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Random units at about the same fraction in every group, as many as fit in `target`."""
    masks, candidates = {}, {}
    for name, size in sizes.items():
        order = torch.randperm(size, generator=generator).tolist()
        masks[name] = torch.zeros(size, dtype=torch.bool)
        masks[name][order[0]] = True  # every group keeps at least one unit
        candidates[name] = order[1:]
    total = sum(sizes.values())
    shares = {name: size / total for name, size in sizes.items()}
    return fill_channels(masks, candidates, shares, count_params, target)
