"""Which tensors are prunable, masks over them, and density accounting.

A mask is a bool tensor shaped like the parameter it gates, keyed by the parameter's name in
`model.named_parameters()`. Example: for `nn.Linear(4, 2)` registered as `fc`, the mask
`{"fc.weight": tensor([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=bool)}` keeps 3 of 8 weights: density
0.375. After every optimizer step `apply_masks` zeroes the gated entries again; they still get
gradients, so SGD keeps a momentum for them that regrowth reads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dnr_deploy.vocabulary import Granularity, Init  # noqa: F401  (re-exported)

Masks = dict[str, torch.Tensor]

# Layer types whose weight is prunable. Both store (out, in, ...) with the output axis first,
# which is all that irregular masks and output-channel units rely on.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


DENSE = "dense"  # the granularity run.json and the manifest record for a run that prunes nothing


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight of every Conv2d and Linear, by parameter name, in module order."""
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    }


def erk_shares(weights: dict[str, torch.Tensor], density: float) -> dict[str, float]:
    """Per-layer density of the ERK init: proportional to (sum of a weight's dims) / (product
    of its dims), scaled so the total is `density`, with layers that would exceed 1 made dense
    and the rest rescaled (the reference's iterative rule)."""
    sizes = {name: w.numel() for name, w in weights.items()}
    raw = {name: sum(w.shape) / w.numel() for name, w in weights.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        rest = {n: raw[n] * sizes[n] for n in sizes if n not in dense}
        scale = budget / max(sum(rest.values()), 1e-12)
        over = [n for n in rest if scale * raw[n] > 1.0]
        if not over:
            return {n: 1.0 if n in dense else scale * raw[n] for n in sizes}
        dense.update(over)


def random_masks(
    weights: dict[str, torch.Tensor], density: float, generator: torch.Generator,
    init: str = Init.UNIFORM.value,
) -> Masks:
    """Random masks with exactly round(density * total) active weights overall, each layer at
    `density` (uniform) or at its ERK density.

    Per-layer counts are rounded down, then the remainder goes one weight each to the layers with
    the largest rounding loss, so the global count is exact from the first step.
    """
    sizes = {name: w.numel() for name, w in weights.items()}
    per_layer = erk_shares(weights, density) if Init(init) is Init.ERK else \
        dict.fromkeys(sizes, density)
    counts = split_budget(round(density * sum(sizes.values())),
                          {n: per_layer[n] * sizes[n] for n in sizes}, sizes)
    masks = {}
    for name, weight in weights.items():
        order = torch.randperm(weight.numel(), generator=generator)
        flat = torch.zeros(weight.numel(), dtype=torch.bool)
        flat[order[: counts[name]]] = True
        masks[name] = flat.view_as(weight)
    return masks


def global_magnitude_masks(weights: dict[str, torch.Tensor], density: float) -> Masks:
    """Keep the round(density * total) largest |weights| across all layers (one threshold)."""
    flat = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, round(density * flat.numel()), sorted=False).indices] = True
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start:start + weight.numel()].view_as(weight)
        start += weight.numel()
    return masks


def split_budget(total: int, shares: dict[str, float], capacity: dict[str, int]) -> dict[str, int]:
    """Split `total` integer units in proportion to `shares`, never above `capacity`.

    Largest-remainder rounding; what a full layer cannot take is spread over the others in
    proportion to their shares. If `total` exceeds the whole capacity, every layer is filled.

    Example: total 10, shares {a: 0.5, b: 0.5}, capacity {a: 2, b: 100} -> {a: 2, b: 8}.
    """
    alloc = dict.fromkeys(shares, 0)
    remaining = min(total, sum(capacity.values()))
    open_keys = [k for k in shares if capacity[k] > 0]
    while remaining > 0 and open_keys:
        weight_sum = sum(max(shares[k], 0.0) for k in open_keys)
        if weight_sum <= 0:  # no signal: split evenly
            ideal = {k: remaining / len(open_keys) for k in open_keys}
        else:
            ideal = {k: remaining * max(shares[k], 0.0) / weight_sum for k in open_keys}
        grant = {k: min(math.floor(ideal[k]), capacity[k] - alloc[k]) for k in open_keys}
        leftover = remaining - sum(grant.values())
        # Hand out rounding remainders, largest fraction first, where room is left.
        by_fraction = sorted(open_keys, key=lambda k: ideal[k] - math.floor(ideal[k]), reverse=True)
        for k in by_fraction:
            if leftover == 0:
                break
            if alloc[k] + grant[k] < capacity[k] and grant[k] < ideal[k]:
                grant[k] += 1
                leftover -= 1
        for k in open_keys:
            alloc[k] += grant[k]
        remaining -= sum(grant.values())
        open_keys = [k for k in open_keys if alloc[k] < capacity[k]]
        if sum(grant.values()) == 0 and remaining > 0:  # all shares rounded to zero
            for k in open_keys[:remaining]:
                alloc[k] += 1
            remaining -= min(remaining, len(open_keys))
            open_keys = [k for k in open_keys if alloc[k] < capacity[k]]
    return alloc


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every gated entry in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))


def layer_densities(masks: Masks, names: list[str] | None = None) -> dict[str, float]:
    names = list(masks) if names is None else names
    return {name: masks[name].float().mean().item() for name in names}


def global_density(masks: Masks, names: list[str]) -> float:
    active = sum(int(masks[n].sum()) for n in names)
    total = sum(masks[n].numel() for n in names)
    return active / total
