"""Channel surgery: a channel-masked network becomes a dense, smaller one, next to the channel
units it removes (`groups.py`).

torch-pruning's dependency graph removes each off unit from every layer it touches (filters,
norms, the consumers' input slices, residual partners), so no architecture is special-cased.
The surgery is recorded as a pruning history that replays on a freshly built model: a shrunk
model is stored as history plus state dict (`export/channel.py`), never as pickled code.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from dnr_deploy.sparsity.groups import ChannelGroup, ChannelMasks

# One torch-pruning history entry: [root module name, is_out_channels, removed indices].
HistoryEntry = list


class ShrinkError(ValueError):
    """Channel masks that cannot be removed physically (unknown unit, wrong size, all off)."""


def check_channel_masks(groups: list[ChannelGroup], channel_masks: ChannelMasks) -> None:
    """Masks must name exactly the model's units, with one bool per channel and one channel on.

    Raises:
        ShrinkError: a unit missing or unknown, a wrong length, or a unit with every channel
            off (removing it would disconnect the network).
    """
    expected = {g.name: g.size for g in groups}
    if set(channel_masks) != set(expected):
        missing = sorted(set(expected) - set(channel_masks))
        unknown = sorted(set(channel_masks) - set(expected))
        raise ShrinkError(
            f"channel masks do not match the model's units (missing {missing}, unknown "
            f"{unknown}); the checkpoint was made for another architecture"
        )
    for name, size in expected.items():
        mask = channel_masks[name]
        if mask.dtype != torch.bool or mask.shape != (size,):
            raise ShrinkError(
                f"channel mask {name!r} must be a bool vector of {size}, got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        if not bool(mask.any()):
            raise ShrinkError(f"unit {name!r} has every channel off; it cannot be removed whole")


def shrink_model(
    model: nn.Module,
    groups: list[ChannelGroup],
    channel_masks: ChannelMasks,
    example_input: torch.Tensor,
) -> tuple[nn.Module, list]:
    """A copy of `model` without its off units, and the pruning history that rebuilds it.

    The history replays on a freshly built model (`replay_pruning`), so a deployed shrunk model
    is stored as history plus state dict, never as pickled code.
    """
    shrunk = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(shrunk, example_inputs=example_input)
    modules = dict(shrunk.named_modules())
    for group in groups:
        off = (~channel_masks[group.name]).nonzero().flatten().tolist()
        if off:
            root = modules[group.convs[0]]
            graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=off).prune()
    return shrunk, graph.pruning_history()


def replay_pruning(model: nn.Module, history: list, example_input: torch.Tensor) -> nn.Module:
    """Apply a recorded pruning history to a fresh model of the same architecture, in place."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    graph.load_pruning_history(history)
    return model


def history_to_json(history: list) -> list[HistoryEntry]:
    """torch-pruning's history as plain JSON values (indices may come back as tensors)."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def parse_history(data: object, source: str) -> list[HistoryEntry]:
    """Validate a history read from JSON.

    Raises:
        ShrinkError: not a list of [module name, bool, list of non-negative ints].
    """
    def valid(entry: object) -> bool:
        return (
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], bool) and isinstance(entry[2], list)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in entry[2])
        )

    if not isinstance(data, list) or not all(valid(entry) for entry in data):
        raise ShrinkError(
            f"{source} is not a pruning history: expected a list of "
            "[module name, is_out_channels, [indices]]"
        )
    return data
