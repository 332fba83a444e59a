"""Channel units: output channels that must be kept or removed together.

A unit is one output channel of a group of convs: its filters, their biases, and the scale and
shift of the batch norms behind them. Example: in ResNet-18 the stem conv and both conv2s of
stage 1 feed the same residual sum, so channel 5 of all three (with bn channel 5 of each) is a
single unit; switching it off zeroes that channel of the sum. The layers that read a group's
channels (its "consumers") lose the matching input slices when export removes the unit.
torch-pruning's dependency graph finds these couplings, so no architecture is special-cased.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch_pruning as tp
from torch import nn

from dnr_deploy.sparsity.masks import PRUNABLE_TYPES, Masks
from dnr_deploy.sparsity.memory_guard import MemoryBudgetExceeded, memory_budget

ChannelMasks = dict[str, torch.Tensor]  # group name -> bool vector over its channels

# What one group's index propagation may add to the process before its convs are left dense.
# Measured at 8x8 (peak resident growth of each get_pruning_group call): at most 2.9 MiB for
# any group of resnet152, efficientnet_b7, efficientnet_v2_l, regnet_y_32gf and
# mobilenet_v3_large; swin_v2_t's one group took 268 s and peaked at 10.9 GB.
PROPAGATION_BUDGET_BYTES = 2 * 2**30


@dataclass
class ChannelGroup:
    """Output channels shared by `convs` (and normalized by `norms`), read by `consumers`.

    A norm or consumer behind a concatenation holds the group's channels as one stretch of its
    own: `offsets` says where it starts (members not listed start at 0)."""

    name: str
    size: int
    convs: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)

    def span(self, member: str) -> slice:
        """The group's channels along `member`'s channel axis."""
        start = self.offsets.get(member, 0)
        return slice(start, start + self.size)


# One stretch of a channel axis: owned by a group (name), or by none (None: never pruned).
Part = tuple[str | None, int]


class ParamTerm(NamedTuple):
    """How one parameter shrinks: (out channels x in channels x entries per pair), each axis
    a sequence of stretches (several groups behind a concatenation)."""

    name: str
    out_parts: tuple[Part, ...]  # axis 0
    in_parts: tuple[Part, ...]  # axis 1 (weights only)
    per_pair: int


# Which side of a layer a dependency touches, by torch-pruning's handler.
# A depthwise conv's output channel c reads only input channel c, so it belongs to the unit of
# the conv that feeds it, as a filter of its own; its in and out handlers are one.
_OUT_HANDLERS = {tp.prune_conv_out_channels: "convs", tp.prune_batchnorm_out_channels: "norms",
                 tp.prune_depthwise_conv_out_channels: "convs"}
_IN_HANDLERS = {tp.prune_conv_in_channels, tp.prune_linear_in_channels}
_PARAMETER_HANDLERS = {tp.prune_parameter_out_channels, tp.prune_parameter_in_channels}


def find_channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Every conv's output channels, merged where a residual addition ties them.

    A depthwise conv joins the group of the conv that feeds it (its filter c is part of unit c,
    as are the norm behind it and a squeeze-excitation's gate on those channels). A group that
    couples channels other than one-to-one (concatenation, a flatten of a spatial map, a grouped
    conv that is not depthwise, a layer type without a handler here) is left out: its convs stay
    dense in channel mode, named by a warning and by `dense_convs`. So is a group whose index
    propagation grows the process past `PROPAGATION_BUDGET_BYTES` (Swin V2's patch embedding).

    Raises:
        ChannelGraphError: torch-pruning cannot trace the model's couplings at all (e.g. the
            reshape of a channel shuffle); irregular mode still works.
    """
    names = {module: name for name, module in model.named_modules()}
    was_training = model.training
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as err:  # torch-pruning's tracer fails in many ways on unusual graphs
        model.train(was_training)
        raise ChannelGraphError(
            f"channel mode cannot trace this model's channel couplings (torch-pruning: "
            f"{type(err).__name__}: {' '.join(str(err).split())[:150]}); use --granularity "
            "irregular") from None
    groups: list[ChannelGroup] = []
    seen: set[str] = set()
    skipped: dict[str, str] = {}  # root conv -> why its group stays dense
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen:
            continue
        group = ChannelGroup(name=name, size=module.out_channels)
        try:
            with memory_budget(PROPAGATION_BUDGET_BYTES):
                pruning_group = graph.get_pruning_group(
                    module, tp.prune_conv_out_channels, idxs=list(range(module.out_channels)))
        except MemoryBudgetExceeded as err:
            seen.add(name)
            skipped[name] = f"torch-pruning's index propagation {err}"
            continue
        except Exception as err:  # an op torch-pruning traced but cannot map: leave it dense
            seen.add(name)
            skipped[name] = f"torch-pruning cannot map it: {type(err).__name__}"
            continue
        reason, members = _collect(group, pruning_group, names)
        seen.update(group.convs)
        if reason is None:
            groups.append(group)
        else:
            seen.update(members)  # a conv of a dense group must not root a group of its own
            skipped[name] = reason
    model.train(was_training)  # tracing may switch modes; leave the caller's model as found
    if skipped:
        listed = "; ".join(f"{conv} ({why})" for conv, why in list(skipped.items())[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(f"channel mode keeps {len(skipped)} conv group(s) dense (a coupling that "
                      f"is not one-to-one, or that torch-pruning cannot map): {listed}{more} "
                      "(run.json's dense_convs lists every dense conv)", ChannelCouplingWarning,
                      stacklevel=2)
    return groups


class ChannelGraphError(ValueError):
    """A model whose channel couplings torch-pruning cannot trace: no channel mode for it."""


class ChannelCouplingWarning(UserWarning):
    """Some convs stay dense in channel mode (see `find_channel_groups`)."""


def _collect(group: ChannelGroup, pruning_group, names: dict) -> tuple[str | None, list[str]]:
    """Fill `group` from torch-pruning's group; the reason it cannot be a unit (or None), and
    every conv whose outputs the coupling ties to the root's."""
    root_idxs = list(range(group.size))
    reason, members = None, []
    for item in pruning_group:
        target, handler = item.dep.target.module, item.dep.handler
        if handler in _PARAMETER_HANDLERS:
            reason = reason or "an unwrapped nn.Parameter"
        if target not in names:
            continue  # elementwise ops, pools, concatenation nodes: no parameters of their own
        member = names[target]
        if isinstance(target, nn.Conv2d) and handler not in _IN_HANDLERS:
            members.append(member)  # its outputs are these channels (a depthwise conv's too)
        if not _supported(target, handler):
            if any(True for _ in target.parameters(recurse=False)):
                reason = reason or f"{member} is a {type(target).__name__}" + (
                    f" with groups={target.groups}" if isinstance(target, nn.Conv2d) else "")
            continue
        side = _OUT_HANDLERS.get(handler, "consumers")
        offset = _stretch_start(sorted(int(i) for i in item.idxs), root_idxs)
        width = _width(target, side)
        # a conv's outputs are the group's channels exactly; a norm or consumer behind a
        # concatenation holds them as one stretch of its channels
        if offset is None or (side == "convs" and width != group.size) \
                or offset + group.size > width:
            reason = reason or f"{member} reads these channels other than one-to-one"
            continue
        getattr(group, side).append(member)
        if offset or width != group.size:
            group.offsets[member] = offset
    return reason, members


def _stretch_start(idxs: list[int], root_idxs: list[int]) -> int | None:
    """Where `idxs` start if they are the root's channels shifted by a constant, else None."""
    if len(idxs) != len(root_idxs) or not idxs:
        return None
    start = idxs[0]
    return start if idxs == [start + i for i in root_idxs] else None


def _supported(module: nn.Module, handler) -> bool:
    """Layers whose channel axes masks and export handle: Conv2d (dense or depthwise),
    BatchNorm2d, Linear. Other grouped convs tie channels in blocks: left dense."""
    if handler not in _OUT_HANDLERS and handler not in _IN_HANDLERS:
        return False
    if type(module) is nn.Conv2d:
        return module.groups == 1 or _is_depthwise(module)
    return isinstance(module, (nn.BatchNorm2d, nn.Linear))


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels > 1


def _width(module: nn.Module, side: str) -> int:
    """Channels on the side of `module` that a group touches (its outputs or its inputs)."""
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if side != "consumers" else module.in_features
    return module.out_channels if side != "consumers" else module.in_channels


def _parts(member: str, size: int, groups: list[ChannelGroup]) -> tuple[Part, ...]:
    """`member`'s channel axis of `size` as stretches: each group's, and None between them."""
    parts: list[Part] = []
    position = 0
    for group in sorted(groups, key=lambda g: g.span(member).start):
        span = group.span(member)
        if span.start > position:
            parts.append((None, span.start - position))
        parts.append((group.name, group.size))
        position = span.stop
    if position < size:
        parts.append((None, size - position))
    return tuple(parts)


def dense_convs(model: nn.Module, groups: list[ChannelGroup]) -> list[str]:
    """Convs that no channel unit gates: channel mode leaves them dense."""
    gated = {conv for g in groups for conv in g.convs}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in gated]


class ChannelLayout:
    """Maps channel masks to parameter masks and to the size of the physically smaller net."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.groups = {g.name: g for g in groups}
        modules = dict(model.named_modules())
        out_side: dict[str, list[ChannelGroup]] = {}
        in_side: dict[str, list[ChannelGroup]] = {}
        for g in groups:
            for member in g.convs + g.norms:
                out_side.setdefault(member, []).append(g)
            for member in g.consumers:
                in_side.setdefault(member, []).append(g)
        self.param_terms: list[ParamTerm] = []  # enough to count the shrunk network exactly
        for mod_name, module in modules.items():
            for p_name, param in module.named_parameters(recurse=False):
                per_pair = math.prod(param.shape[2:]) if param.dim() > 2 else 1
                out_parts = _parts(mod_name, param.shape[0], out_side.get(mod_name, []))
                in_parts = _parts(mod_name, param.shape[1], in_side.get(mod_name, [])) \
                    if param.dim() > 1 else ((None, 1),)
                full_name = f"{mod_name}.{p_name}" if mod_name else p_name
                self.param_terms.append(ParamTerm(full_name, out_parts, in_parts, per_pair))
        def params_of(module_names: list[str]) -> list[tuple[str, torch.Size]]:
            return [
                (f"{m}.{p_name}", param.shape)
                for m in module_names
                for p_name, param in modules[m].named_parameters(recurse=False)
            ]

        self.unit_params = {g.name: params_of(g.convs + g.norms) for g in groups}
        self.filter_params = {g.name: params_of(g.convs) for g in groups}
        self.prunable = {
            f"{n}.weight" for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES)
        }

    def active_counts(self, masks: ChannelMasks) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in masks.items()}

    def deployed_params(self, masks: ChannelMasks, prunable_only: bool = False) -> int:
        """Parameters of the network with every off unit physically removed."""
        active = self.active_counts(masks)

        def kept(parts: tuple[Part, ...]) -> int:
            return sum(active[group] if group else size for group, size in parts)

        total = 0
        for term in self.param_terms:
            if prunable_only and term.name not in self.prunable:
                continue
            total += kept(term.out_parts) * kept(term.in_parts) * term.per_pair
        return total

    def dense_params(self, prunable_only: bool = False) -> int:
        full = {name: torch.ones(g.size, dtype=torch.bool) for name, g in self.groups.items()}
        return self.deployed_params(full, prunable_only)

    def layer_densities(self, masks: ChannelMasks) -> dict[str, float]:
        """Fraction of each prunable weight that survives removal (out and in channels)."""
        def fraction(parts: tuple[Part, ...]) -> float:
            kept = sum(int(masks[group].sum()) if group else size for group, size in parts)
            return kept / sum(size for _, size in parts)

        return {term.name: fraction(term.out_parts) * fraction(term.in_parts)
                for term in self.param_terms if term.name in self.prunable}

    def param_masks(self, masks: ChannelMasks) -> Masks:
        """Masks over each unit's own parameters (filters, biases, norm scale and shift).

        Consumer weights are left ungated: an off unit outputs exactly zero, so they multiply
        zeros, and keeping them lets a regrown unit reconnect at once. A norm behind a
        concatenation is gated stretch by stretch, one per group it normalizes.
        """
        result: Masks = {}
        for group_name, members in self.unit_params.items():
            group, on = self.groups[group_name], masks[group_name]
            for name, shape in members:
                if name not in result:
                    result[name] = torch.ones(shape, dtype=torch.bool)
                view = on.view((-1,) + (1,) * (len(shape) - 1))
                result[name][group.span(name.rpartition(".")[0])] = view.expand(
                    (group.size, *shape[1:]))
        return result

    def unit_rows(
        self, tensors: dict[str, torch.Tensor], group_name: str, filters_only: bool
    ) -> torch.Tensor:
        """One row per channel of the group: its entries of `tensors` (params or momenta),
        concatenated over the group's convs (and norms, unless `filters_only`)."""
        group = self.groups[group_name]
        members = self.filter_params if filters_only else self.unit_params
        rows = [tensors[name][group.span(name.rpartition(".")[0])].reshape(group.size, -1)
                for name, _ in members[group_name]]
        return torch.cat(rows, dim=1)
