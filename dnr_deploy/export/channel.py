"""Physical channel removal: a channel-masked network becomes a dense, smaller one.

torch-pruning's dependency graph removes each off unit from every layer it touches (filters,
norms, the consumers' input slices, residual partners), so no architecture is special-cased.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from dnr_deploy.sparsity.groups import ChannelGroup, ChannelMasks


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
