"""Sparsity policies: the hooks the one training loop calls to keep a network sparse.

The loop owns the order (optimizer step, then `on_step_end` with the global step count; epoch,
then `on_epoch_end` unless it was the last); a policy owns the masks and how they change. DNR
rewires inside `on_step_end` when its `RewireSchedule` says so, a pure function of (step, total
steps), so a resumed run rewires at the same steps. `DensePolicy` is the no-op base, which is
also the `--dense` baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from dnr_deploy.sparsity.groups import ChannelLayout, ChannelMasks, find_channel_groups
from dnr_deploy.sparsity.masks import (
    Granularity,
    Init,
    Masks,
    apply_masks,
    global_density,
    global_magnitude_masks,
    layer_densities,
    prunable_weights,
    random_masks,
)
from dnr_deploy.sparsity.rewire import (
    Redistribution,
    RewireSchedule,
    random_channel_masks,
    rewire_channels,
    rewire_irregular,
)


class DensePolicy:
    """No masks: every hook is a no-op."""

    granularity: str = "dense"

    def on_step_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
        step: int = 0, total_steps: int = 0,
    ) -> dict:
        """Runs after every optimizer step; `step` counts steps from the start of training
        (1-based) out of `total_steps`. Returns the figures of a rewire, {} if none happened
        (and always {} without an optimizer: masks only)."""
        return {}

    def on_epoch_end(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, epochs: int
    ) -> dict[str, float]:
        """Runs after every epoch but the last; returns figures worth logging."""
        return {}

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
                 init: Init = Init.UNIFORM) -> None:
        self.generator = generator
        self.weights = prunable_weights(model)
        cpu_weights = {n: w.detach().cpu() for n, w in self.weights.items()}
        self.masks = self._to_device(random_masks(cpu_weights, density, generator, init))
        apply_masks(model, self.masks)

    def _to_device(self, masks: Masks) -> Masks:
        return {name: m.to(self.weights[name].device) for name, m in masks.items()}

    def on_step_end(self, model, optimizer=None, step=0, total_steps=0):
        apply_masks(model, self.masks)
        return {}

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
    """Single-weight masks on every Conv2d and Linear weight, rewired on a step schedule."""

    def __init__(self, model: nn.Module, density: float, generator: torch.Generator,
                 init: Init = Init.UNIFORM, schedule: RewireSchedule | None = None,
                 redistribution: Redistribution = Redistribution.MOMENTUM) -> None:
        super().__init__(model, density, generator, init)
        self.schedule = schedule or RewireSchedule()
        self.redistribution = Redistribution(redistribution)

    def on_step_end(self, model, optimizer=None, step=0, total_steps=0):
        apply_masks(model, self.masks)
        if optimizer is None or not self.schedule.due(step, total_steps):
            return {}
        return self.rewire(model, optimizer, self.schedule.fraction(step, total_steps))

    def rewire(self, model: nn.Module, optimizer: torch.optim.Optimizer, fraction: float) -> dict:
        """Prune `fraction` of each layer, regrow by momentum; returns what to log."""
        cpu = lambda tensors: {n: t.detach().cpu() for n, t in tensors.items()}  # noqa: E731
        rewired, shares = rewire_irregular(
            cpu(self.weights), cpu(momenta_of(optimizer, self.weights)), cpu(self.masks),
            fraction, self.redistribution,
        )
        self.masks = self._to_device(rewired)
        # Regrown weights start at zero (they were masked), so the function is unchanged.
        apply_masks(model, self.masks)
        return {"prune_fraction": fraction, "layer_densities": self.layer_densities(),
                "momentum_shares": shares}


class MagnitudePrune(StaticSparse):
    """Dense PGD training for the first half of the epochs, one global magnitude prune to the
    target density, then fine-tuning with the masks fixed (Sehwag et al. 2019; the "magnitude"
    column of HYDRA): the robust prune-then-finetune pipeline in the same epoch budget."""

    def __init__(self, model: nn.Module, density: float, generator: torch.Generator,
                 init: Init = Init.UNIFORM) -> None:
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


class ChannelDNR(DensePolicy):
    """Whole output-channel units; the budget is the weight count of the shrunk network."""

    granularity = Granularity.CHANNEL.value

    def __init__(
        self, model: nn.Module, density: float, generator: torch.Generator,
        example_input: torch.Tensor, schedule: RewireSchedule | None = None,
        redistribution: Redistribution = Redistribution.MOMENTUM,
    ) -> None:
        self.generator = generator
        self.schedule = schedule or RewireSchedule()
        self.redistribution = Redistribution(redistribution)
        self.layout = ChannelLayout(model, find_channel_groups(model, example_input))
        self.params = dict(model.named_parameters())
        self.target = round(density * self.layout.dense_params(prunable_only=True))
        sizes = {name: g.size for name, g in self.layout.groups.items()}
        self.channel_masks = random_channel_masks(sizes, self._count, self.target, generator)
        self._update_masks()
        apply_masks(model, self.masks)

    def _count(self, masks: ChannelMasks) -> int:
        return self.layout.deployed_params(masks, prunable_only=True)

    def _update_masks(self) -> None:
        masks = self.layout.param_masks(self.channel_masks)
        self.masks = {n: m.to(self.params[n].device) for n, m in masks.items()}

    def on_step_end(self, model, optimizer=None, step=0, total_steps=0):
        apply_masks(model, self.masks)
        if optimizer is None or not self.schedule.due(step, total_steps):
            return {}
        return self.rewire(model, optimizer, self.schedule.fraction(step, total_steps))

    def importance(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-unit score for pruning. Batch norm divides out a filter's scale, so where the
        unit has norms the score is the norm of its BN scales |gamma| times the filter norm
        (network slimming, Liu et al. 2017, with the filter as tie-break); filter norm alone
        where no norm follows."""
        scores = {}
        for name, group in self.layout.groups.items():
            filters = self.layout.unit_rows(params, name, filters_only=True).norm(dim=1)
            if group.norms:
                gammas = torch.stack([params[f"{n}.weight"] for n in group.norms], dim=1)
                filters = filters * gammas.norm(dim=1)
            scores[name] = filters
        return scores

    def rewire(self, model: nn.Module, optimizer: torch.optim.Optimizer, fraction: float) -> dict:
        """Prune `fraction` of each group's units, refill the budget by momentum."""
        params = {n: p.detach().cpu() for n, p in self.params.items()}
        momenta = {n: m.cpu() for n, m in momenta_of(optimizer, self.params).items()}
        momentum_rows = {g: self.layout.unit_rows(momenta, g, filters_only=False)
                         for g in self.layout.groups}
        rewired, shares = rewire_channels(
            self.importance(params), momentum_rows, self.channel_masks, fraction, self._count,
            self.target, self.generator, self.redistribution,
        )
        grown = {g: rewired[g] & ~self.channel_masks[g] for g in rewired}
        self.channel_masks = rewired
        self._reinitialize(model, grown)
        self._update_masks()
        apply_masks(model, self.masks)
        return {"prune_fraction": fraction, "layer_densities": self.layer_densities(),
                "momentum_shares": shares}

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
                idx = on.nonzero().flatten().to(norm.weight.device)
                norm.weight[idx], norm.bias[idx] = 1.0, 0.0
                norm.running_mean[idx], norm.running_var[idx] = 0.0, 1.0

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


class StaticChannel(ChannelDNR):
    """Random channel units filled to the same parameter budget as channel DNR, never rewired:
    the channel-granularity ablation of what rewiring buys."""

    def on_step_end(self, model, optimizer=None, step=0, total_steps=0):
        apply_masks(model, self.masks)
        return {}
