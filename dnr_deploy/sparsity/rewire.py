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

import torch

from dnr_deploy.sparsity.masks import Masks, split_budget
from dnr_deploy.vocabulary import ChannelShares, Redistribution  # noqa: F401  (re-exported)


def normalized(values: dict[str, float]) -> dict[str, float]:
    """`values` divided by their sum; uniform when nothing is positive (e.g. every momentum is
    zero before the first step)."""
    total = sum(values.values())
    if total <= 0:
        return {name: 1.0 / len(values) for name in values}
    return {name: value / total for name, value in values.items()}


def normalized_momentum(momenta: dict[str, torch.Tensor], masks: Masks) -> dict[str, float]:
    """Mean |momentum| over each layer's active weights, divided by the sum over layers.

    A layer whose weights the loss keeps pushing on is a layer that wants more capacity. The
    result sums to 1 (uniform if every layer's momentum is zero, e.g. before the first step).
    """
    means = {}
    for name, mask in masks.items():
        active = momenta[name].abs()[mask]
        means[name] = active.mean().item() if active.numel() else 0.0
    return normalized(means)


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


def regrowth_shares(momenta: dict[str, torch.Tensor], masks: Masks) -> dict[str, float]:
    """Each layer's share of the freed budget: its normalized momentum times its size.

    DNR's normalized momentum (mean |momentum| of the active weights) alone gives every layer
    about the same share whatever its size, so rewiring drifts toward equal weight counts per
    layer (measured: the largest conv, 61% of the weights, ended at 2.2% density at a 5%
    target). Weighted by size, equal momentum keeps the allocation where it is and the
    momentum moves it: the layers whose weights the loss pushes on harder gain.
    """
    means = normalized_momentum(momenta, masks)
    return normalized({name: means[name] * mask.numel() for name, mask in masks.items()})


def rewire_irregular(
    weights: dict[str, torch.Tensor],
    momenta: dict[str, torch.Tensor],
    masks: Masks,
    fraction: float,
    redistribution: str = Redistribution.MOMENTUM.value,
) -> tuple[Masks, dict[str, float]]:
    """One DNR rewire over all layers; returns the new masks and each layer's regrowth share.

    Every layer drops `fraction` of its active weights with the smallest magnitude, except a
    nearly dense layer (density >= 0.95) whose share exceeds its size's share: it would take
    the weights straight back (Dettmers & Zettlemoyer 2019). The freed budget is regrown by
    `regrowth_shares` (or, with redistribution "none", in the layer that freed it), at the
    inactive positions of largest |momentum|; a position pruned a moment ago may come back if
    its momentum says so.
    """
    shares = regrowth_shares(momenta, masks)
    total = sum(mask.numel() for mask in masks.values())
    pruned, dropped = {}, {}
    for name, mask in masks.items():
        nearly_dense = mask.float().mean() >= 0.95 and shares[name] >= mask.numel() / total
        dropped[name] = 0 if nearly_dense else math.floor(fraction * int(mask.sum()))
        pruned[name] = prune_smallest(weights[name], mask, dropped[name])
    if Redistribution(redistribution) is Redistribution.NONE:
        regrow_counts, shares = dropped, {n: c / max(sum(dropped.values()), 1)
                                          for n, c in dropped.items()}
    else:
        free_slots = {name: int((~mask).sum()) for name, mask in pruned.items()}
        regrow_counts = split_budget(sum(dropped.values()), shares, free_slots)
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


def unit_row_masks(
    momentum_rows: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each unit's on/off spread over its row of parameters, to weigh rows as weights."""
    return {g: m.view(-1, 1).expand_as(momentum_rows[g]) for g, m in masks.items()}


def channel_cost_shares(
    momentum_rows: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    count_params: Callable[[dict[str, torch.Tensor]], int],
) -> dict[str, float]:
    """Each unit group's share of the freed budget: its normalized momentum times the
    parameters its active units cost in the shrunk network.

    A unit costs its own filter and a slice of every consumer, so its price depends on the
    neighbours' widths: the first conv's filters hold 9 weights, but each of its units also
    costs a 9-weight slice of every active unit of the next conv. Weighted by dense rows
    instead ("size"), such a group is undercounted and narrows (measured: conv1 at 10 of 32
    units). Weighted by cost, equal momentum keeps the allocation and momentum moves it.
    """
    means = normalized_momentum(momentum_rows, unit_row_masks(momentum_rows, masks))
    count = count_params(masks)
    demand = {}
    for name, mask in masks.items():
        active = mask.nonzero().flatten()
        one_fewer = {**masks, name: mask.clone()}
        one_fewer[name][active[0]] = False
        demand[name] = means[name] * len(active) * max(count - count_params(one_fewer), 1)
    return normalized(demand)


def rewire_channels(
    importance: dict[str, torch.Tensor],
    momentum_rows: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    fraction: float,
    count_params: Callable[[dict[str, torch.Tensor]], int],
    target: int,
    generator: torch.Generator,
    explore: bool = False,
    shares_by: str = ChannelShares.COST.value,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One DNR rewire over channel units (`importance`: one score per channel of a group;
    rows: one row of momenta per channel).

    Prune: each group drops the fraction `fraction` of its active units of smallest
    importance (the caller's batch-norm-aware score), always keeping one so the network stays
    connected. Regrow: the freed parameter budget is split by size-aware momentum shares
    (`shares_by`: `regrowth_shares` over the groups' dense rows, or `channel_cost_shares`) and
    filled with inactive units of largest momentum norm. An off unit sits behind a ReLU at
    exactly zero, so its momentum only decays: regrowth mostly re-enables the units it just
    pruned (kept with their weights). With `explore`, those are excluded and the regrown units
    are off ones, ordered at random (seeded) where their momenta tie at zero, restarting as fresh
    channels.
    """
    if ChannelShares(shares_by) is ChannelShares.COST:
        shares = channel_cost_shares(momentum_rows, masks, count_params)
    else:
        shares = regrowth_shares(momentum_rows, unit_row_masks(momentum_rows, masks))
    pruned = {}
    for name, mask in masks.items():
        active = int(mask.sum())
        count = min(math.floor(fraction * active), active - 1)
        pruned[name] = prune_smallest(importance[name], mask, count)
    candidates = {}
    for name, mask in pruned.items():
        just_pruned = masks[name] & ~mask
        scores = momentum_rows[name].norm(dim=1)
        shuffle = torch.randperm(mask.numel(), generator=generator)
        order = shuffle[torch.argsort(scores[shuffle], descending=True, stable=True)]
        candidates[name] = [int(i) for i in order
                            if not mask[i] and not (explore and just_pruned[i])]
    return fill_channels(pruned, candidates, shares, count_params, target), shares


def keep_top_fraction(
    importance: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    count_params: Callable[[dict[str, torch.Tensor]], int],
    target: int,
) -> dict[str, torch.Tensor]:
    """Masks that keep, in every group, the same fraction of its active units (the most
    important ones, at least one), that fraction the largest whose count fits in `target`.

    Importance is compared within a group only: the scores of different layers are on scales
    of their own (a global ranking would empty whole layers). The count falls as the fraction
    does, so the fraction is found by bisection.
    """
    def kept(fraction: float) -> dict[str, torch.Tensor]:
        result = {}
        for name, mask in masks.items():
            active = int(mask.sum())
            drop = active - max(math.ceil(fraction * active), 1)
            result[name] = prune_smallest(importance[name], mask, drop)
        return result

    low, high = 0.0, 1.0
    if count_params(kept(high)) <= target:
        return kept(high)
    for _ in range(30):  # 2**-30 of a fraction: finer than one unit of any layer
        middle = (low + high) / 2
        if count_params(kept(middle)) <= target:
            low = middle
        else:
            high = middle
    return kept(low)


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
    shares = normalized(dict(sizes))
    return fill_channels(masks, candidates, shares, count_params, target)
