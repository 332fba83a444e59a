"""Sparsity policies: the hooks the one training loop calls to keep a network sparse.

The loop owns the order (step, then `on_step_end`, then `rewire` when the schedule says so;
epoch, then `on_epoch_end` unless it was the last); a policy owns the masks and how they
change. `DensePolicy` is the no-op base, which is also the `--dense` baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from dnr_deploy.sparsity.groups import (
    ChannelLayout,
    ChannelMasks,
    dense_convs,
    find_channel_groups,
)
from dnr_deploy.sparsity.masks import (
    DENSE,
    Granularity,
    Masks,
    apply_masks,
    global_density,
    global_magnitude_masks,
    layer_densities,
    prunable_weights,
    random_masks,
)
from dnr_deploy.sparsity.rewire import (
    ChannelShares,
    Redistribution,
    keep_top_fraction,
    random_channel_masks,
    rewire_channels,
    rewire_irregular,
)
from dnr_deploy.sparsity.schedule import cubic_density
from dnr_deploy.sparsity.surgery import shrink_model


class DensePolicy:
    """No masks: every hook is a no-op."""

    granularity: str = DENSE

    def on_step_end(self, model: nn.Module) -> None:
        """Runs after every optimizer step."""

    def on_epoch_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, epochs: int
    ) -> dict[str, float]:
        """Runs after every epoch but the last; returns figures worth logging."""
        return {}

    def rewire(self, model: nn.Module, optimizer: torch.optim.Optimizer, fraction: float,
               progress: float = 1.0) -> dict:
        """Runs after the optimizer steps the rewiring schedule picks; `fraction` of each
        layer's active weights is pruned and regrown, and `progress` of the rewiring is done
        after it (1.0 at the last). Returns what the rewire did (per-layer densities and
        regrowth shares) for metrics.jsonl, {} for policies that never rewire."""
        return {}

    def deployed(self, model: nn.Module, example_input: torch.Tensor
                 ) -> tuple[nn.Module, Masks | None]:
        """What export will ship for `model`: the network run with dense kernels, and the
        masks whose zeros are stored sparsely (None: nothing is)."""
        return model, None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def density(self) -> float:
        return 1.0

    def layer_densities(self) -> dict[str, float]:
        return {}


def momenta_of(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict:
    """SGD momentum buffer of each named parameter (zeros before the first step)."""
    result = {}
    for name, param in params.items():
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        result[name] = torch.zeros_like(param) if buffer is None else buffer.detach()
    return result


class StaticSparse(DensePolicy):
    """Random single-weight masks at the target density, uniform per layer, never rewired:
    the ablation that shows what rewiring buys."""

    granularity = Granularity.IRREGULAR.value

    def __init__(self, model: nn.Module, density: float, generator: torch.Generator,
                 init: str = "uniform") -> None:
        self.generator = generator
        self.weights = prunable_weights(model)
        cpu_weights = {n: w.detach().cpu() for n, w in self.weights.items()}
        self.masks = self._to_device(random_masks(cpu_weights, density, generator, init))
        apply_masks(model, self.masks)

    def _to_device(self, masks: Masks) -> Masks:
        return {name: m.to(self.weights[name].device) for name, m in masks.items()}

    def on_step_end(self, model: nn.Module) -> None:
        apply_masks(model, self.masks)

    def deployed(self, model, example_input):
        return model, self.masks

    def state_dict(self) -> dict:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["masks"] and set(state["masks"]) != set(self.weights):
            raise ValueError("checkpoint masks do not match this model's prunable layers")
        self.masks = self._to_device(state["masks"])
        self.generator.set_state(state["generator"])

    def density(self) -> float:
        return global_density(self.masks, list(self.masks)) if self.masks else 1.0

    def layer_densities(self) -> dict[str, float]:
        return layer_densities(self.masks)


class IrregularDNR(StaticSparse):
    """Single-weight masks on every Conv2d and Linear weight, rewired on the schedule."""

    def __init__(self, model: nn.Module, density: float, generator: torch.Generator,
                 init: str = "uniform",
                 redistribution: str = Redistribution.MOMENTUM.value,
                 start_density: float | None = None) -> None:
        super().__init__(model, start_density or density, generator, init)
        self.redistribution = redistribution
        self.target, self.start = density, start_density

    def rewire(self, model, optimizer, fraction, progress=1.0):
        cpu = lambda tensors: {n: t.detach().cpu() for n, t in tensors.items()}  # noqa: E731
        masks, weights = cpu(self.masks), cpu(self.weights)
        density = cubic_density(self.start, self.target, progress)
        if self.start is not None and density < global_density(masks, list(masks)):
            # masked weights are zero (re-zeroed after every step), so one global threshold
            # keeps the largest active ones
            masks = global_magnitude_masks(weights, density)
        rewired, shares = rewire_irregular(
            weights, cpu(momenta_of(optimizer, self.weights)), masks, fraction,
            self.redistribution)
        self.masks = self._to_device(rewired)
        # Regrown weights start at zero (they were masked), so the function is unchanged.
        apply_masks(model, self.masks)
        return {"prune_fraction": fraction, "layer_densities": self.layer_densities(),
                "regrowth_shares": shares}


class MagnitudePrune(StaticSparse):
    """Dense PGD training for the first half of the epochs, one global magnitude prune to the
    target density, then fine-tuning with the masks fixed (Sehwag et al. 2019; the "magnitude"
    column of HYDRA): the robust prune-then-finetune pipeline in the same epoch budget."""

    def __init__(self, model: nn.Module, density: float, generator: torch.Generator) -> None:
        self.generator = generator
        self.weights = prunable_weights(model)
        self.target = density
        self.masks = {}

    def on_epoch_end(self, model, optimizer, epoch, epochs):
        if epoch != max(epochs // 2 - 1, 0):
            return {}
        cpu_weights = {n: w.detach().cpu() for n, w in self.weights.items()}
        self.masks = self._to_device(global_magnitude_masks(cpu_weights, self.target))
        apply_masks(model, self.masks)
        return {"pruned": 1.0}


class ChannelBudgetError(ValueError):
    """A channel density below what the model's unprunable convs allow."""


class ChannelDNR(DensePolicy):
    """Whole output-channel units; the budget is the weight count of the shrunk network."""

    granularity = Granularity.CHANNEL.value

    def __init__(
        self, model: nn.Module, density: float, generator: torch.Generator,
        example_input: torch.Tensor, explore: bool = False, start_density: float | None = None,
        shares_by: str = ChannelShares.COST.value,
    ) -> None:
        self.generator = generator
        self.explore, self.shares_by = explore, shares_by
        self.layout = ChannelLayout(model, find_channel_groups(model, example_input))
        self.params = dict(model.named_parameters())
        self.density_target, self.start = density, start_density
        sizes = {name: g.size for name, g in self.layout.groups.items()}
        self._check_reachable(density, sizes, model)
        self.channel_masks = random_channel_masks(
            sizes, self._count, self._budget(start_density or density), generator)
        self._update_masks()
        apply_masks(model, self.masks)

    def _count(self, masks: ChannelMasks) -> int:
        return self.layout.deployed_params(masks, prunable_only=True)

    def _budget(self, density: float) -> int:
        """Parameters of the shrunk network's prunable layers at `density`."""
        return round(density * self.layout.dense_params(prunable_only=True))

    def _check_reachable(self, density: float, sizes: dict[str, int], model: nn.Module) -> None:
        """Raises:
            ChannelBudgetError: one channel on in every unit group already exceeds the target
                (the convs channel mode leaves dense keep too many weights)."""
        smallest = {name: torch.arange(size) == 0 for name, size in sizes.items()}
        floor = self._count(smallest) / self.layout.dense_params(prunable_only=True)
        if floor > density:
            dense = len(dense_convs(model, list(self.layout.groups.values())))
            # a quarter above the floor leaves room to choose units; past 1 there is none
            advice = (f"use --density {floor * 1.25:.2g} or more, or --granularity irregular"
                      if floor * 1.25 <= 1.0 else "use --granularity irregular")
            raise ChannelBudgetError(
                f"channel mode cannot reach density {density:g} on this model: with one channel "
                f"left in every unit the density is still {floor:.3g}, because the {dense} "
                "convs it must leave dense (grouped convs and what they tie) and its layers other "
                f"than convs keep their weights; {advice}")

    def _update_masks(self) -> None:
        masks = self.layout.param_masks(self.channel_masks)
        self.masks = {n: m.to(self.params[n].device) for n, m in masks.items()}

    def on_step_end(self, model: nn.Module) -> None:
        apply_masks(model, self.masks)

    def rewire(self, model, optimizer, fraction, progress=1.0):
        params = {n: p.detach().cpu() for n, p in self.params.items()}
        momenta = {n: m.cpu() for n, m in momenta_of(optimizer, self.params).items()}
        rows = self.layout.unit_rows
        importance = {g: self._importance(params, g) for g in self.layout.groups}
        momentum_rows = {g: rows(momenta, g, filters_only=False) for g in self.layout.groups}
        budget = self._budget(cubic_density(self.start, self.density_target, progress))
        masks = self.channel_masks
        if self.start is not None and budget < self._count(masks):
            # gradual channel pruning: every unit group keeps the same top fraction of its
            # active units by importance, then momentum moves the budget between groups
            masks = keep_top_fraction(importance, masks, self._count, budget)
        rewired, shares = rewire_channels(
            importance, momentum_rows, masks, fraction, self._count, budget,
            self.generator, self.explore, self.shares_by,
        )
        grown = {g: rewired[g] & ~masks[g] for g in rewired}
        self.channel_masks = rewired
        self._reinitialize(model, grown)
        self._update_masks()
        apply_masks(model, self.masks)
        return {"prune_fraction": fraction, "layer_densities": self.layer_densities(),
                "regrowth_shares": shares}

    def _importance(self, params: dict[str, torch.Tensor], group_name: str) -> torch.Tensor:
        """Filter norm times |batch-norm scale| per channel: the norm that follows a conv
        divides its filter's scale out, so the filter norm alone ranks nothing; gamma is what
        the channel actually contributes."""
        filters = self.layout.unit_rows(params, group_name, filters_only=True).norm(dim=1)
        group = self.layout.groups[group_name]
        if not group.norms:
            return filters
        gamma = torch.stack([params[f"{n}.weight"][group.span(n)].abs()
                             for n in group.norms]).mean(dim=0)
        return filters * gamma

    @torch.no_grad()
    def _reinitialize(self, model: nn.Module, grown: ChannelMasks) -> None:
        """A regrown unit starts as a fresh channel: a zero filter behind a ReLU at zero would
        never receive a gradient, so filters get Kaiming init and norms scale 1, shift 0."""
        modules = dict(model.named_modules())
        for group_name, on in grown.items():
            if not on.any():
                continue
            group = self.layout.groups[group_name]
            for conv_name in group.convs:
                conv = modules[conv_name]
                fresh = torch.empty(conv.weight.shape)
                # the policy's own generator: every DDP rank draws the same fresh filters
                nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu",
                                        generator=self.generator)
                idx = on.nonzero().flatten().to(conv.weight.device)
                conv.weight[idx] = fresh.to(conv.weight.device)[idx]
            for norm_name in group.norms:
                norm = modules[norm_name]
                start = group.span(norm_name).start  # behind a concatenation: its stretch
                idx = (on.nonzero().flatten() + start).to(norm.weight.device)
                norm.weight[idx], norm.bias[idx] = 1.0, 0.0
                norm.running_mean[idx], norm.running_var[idx] = 0.0, 1.0

    def deployed(self, model, example_input):
        """The network with its off units physically removed, exactly as export builds it."""
        groups = list(self.layout.groups.values())
        return shrink_model(model, groups, self.channel_masks, example_input)[0], None

    def state_dict(self) -> dict:
        return {"channel_masks": dict(self.channel_masks), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if set(state["channel_masks"]) != set(self.channel_masks):
            raise ValueError("checkpoint channel units do not match this model's")
        self.channel_masks = state["channel_masks"]
        self.generator.set_state(state["generator"])
        self._update_masks()

    def density(self) -> float:
        return self._count(self.channel_masks) / self.layout.dense_params(prunable_only=True)

    def layer_densities(self) -> dict[str, float]:
        return self.layout.layer_densities(self.channel_masks)


class StaticChannels(ChannelDNR):
    """Random channel units filled to the same parameter budget as DNR's, never rewired: the
    channel ablation that shows what rewiring buys."""

    def rewire(self, model, optimizer, fraction, progress=1.0):
        return {}
