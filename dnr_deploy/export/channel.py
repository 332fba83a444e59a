"""Physical channel removal: a channel-masked network becomes a dense, smaller one.

torch-pruning's dependency graph removes each off unit from every layer it touches (filters,
norms, the consumers' input slices, residual partners), so no architecture is special-cased.
A shrunk model is stored as its pruning history (JSON) plus its state dict (.npz read with
`allow_pickle=False`), and rebuilt by replaying the history on a freshly built model: nothing
is ever unpickled.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from dnr_deploy.checkpoint import write_atomic
from dnr_deploy.deploydir.names import HISTORY_FILE, WEIGHTS_FILE
from dnr_deploy.export.csr import inflate_limit, read_npz
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


def save_state(directory: Path, model: nn.Module, history: list) -> None:
    """Write `weights.npz` (the state dict) and `pruning_history.json` into `directory`."""
    arrays = {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
    write_atomic(directory / WEIGHTS_FILE, lambda tmp: _savez(tmp, arrays))
    text = json.dumps(history_to_json(history)) + "\n"
    write_atomic(directory / HISTORY_FILE, lambda tmp: tmp.write_text(text))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to a name
        np.savez(file, **arrays)


def load_state(
    directory: Path, max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], list[HistoryEntry]]:
    """The state dict and pruning history that `save_state` wrote, without unpickling.

    `max_bytes` bounds what weights.npz may inflate to (see `csr.inflate_limit`).

    Raises:
        ShrinkError: a file missing, unreadable, or not what `save_state` writes.
    """
    weights, history_file = directory / WEIGHTS_FILE, directory / HISTORY_FILE
    for file in (weights, history_file):
        if not file.is_file():
            raise ShrinkError(f"{str(directory)!r} has no {file.name}")
    check = inflate_limit(max_bytes) if max_bytes is not None else None
    try:
        state = {name: torch.from_numpy(array.copy())
                 for name, array in read_npz(weights, check).items()}
        history = json.loads(history_file.read_text())
    except (OSError, ValueError, TypeError, RecursionError) as err:  # TypeError: a non-number
        # array that torch cannot hold; NpzError and JSON errors are ValueErrors
        raise ShrinkError(f"cannot read the model in {str(directory)!r}: {err}") from None
    return state, parse_history(history, str(history_file))
