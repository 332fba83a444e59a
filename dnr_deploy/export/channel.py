"""Storage of a channel (or dense) run's deployed network: its pruning history (JSON) and its
state dict (.npz read with `allow_pickle=False`), rebuilt by replaying the history on a freshly
built model (`sparsity.surgery`): nothing is ever unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnr_deploy.compress.checkpoint import write_atomic
from dnr_deploy.deploydir.names import HISTORY_FILE, WEIGHTS_FILE
from dnr_deploy.export.csr import inflate_limit, read_npz
from dnr_deploy.sparsity.surgery import HistoryEntry, ShrinkError, history_to_json, parse_history


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
