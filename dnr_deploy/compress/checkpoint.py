"""Run-dir files: atomic writes, safe loading, and the pointer to the latest run.

Every file is written to a temporary name in its own folder and renamed when complete, so a crash
or Ctrl-C leaves either the old file or the new one, never half of one. Checkpoints load with
`weights_only=True`: a checkpoint is data, and a file from elsewhere never runs code here.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnr_deploy.files import (  # noqa: F401  (re-exported: the run dir contract)
    are_figures,
    are_numbers,
    artifact_file,
    is_count,
    is_number,
    plain_name,
    read_json_object,
    remove_stale_temps,
    sha256_of,
    write_atomic,
    write_json,
    write_jsonl,
)

CHECKPOINT_FORMAT = "dnr-deploy/checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
RUN_JSON = "run.json"
METRICS_JSONL = "metrics.jsonl"
LATEST_POINTER = Path("runs") / "LATEST"  # relative to the working directory; names a run in runs/


class CheckpointError(ValueError):
    """A checkpoint or run dir that cannot be used (missing, corrupt, wrong format)."""


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write the checkpoint atomically: a failed write (a full disk) leaves the previous one.

    Raises:
        CheckpointError: the file system refused the write (torch.save reports a full disk
            as a RuntimeError from its zip writer, not as an OSError).
    """
    state = {"format": CHECKPOINT_FORMAT, **state}
    import torch  # here, not at the top: reading run.json (dnr-report) needs no torch

    file = run_dir / CHECKPOINT_NAME
    try:
        write_atomic(file, lambda tmp: torch.save(state, tmp))
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {str(file)!r}: "
                              f"{err.strerror or err}") from None
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"cannot write checkpoint {str(file)!r}: {reason} "
                              "(is the disk full?)") from None


def write_failed(err: Exception, run_dir: Path, saved_epoch: int | None) -> CheckpointError:
    """The one line for a run's failed write (a full disk): what failed, and what is left to
    resume from (`saved_epoch`: the epoch of the checkpoint on disk, None: none)."""
    if isinstance(err, OSError):
        err = f"cannot write {str(err.filename or run_dir)!r}: {err.strerror or err}"
    if saved_epoch is None:
        return CheckpointError(f"{err}; no checkpoint was kept")
    return CheckpointError(f"{err}; the checkpoint of epoch {saved_epoch} is kept in {run_dir} "
                           f"(free some space, then continue with --resume {run_dir})")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return artifact_file(path, CHECKPOINT_NAME, CheckpointError) if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without unpickling code.

    Raises:
        CheckpointError: missing, unreadable, truncated, or not a dnr-deploy checkpoint.
    """
    file = resolve_checkpoint(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {str(file)!r}")
    _check_not_inflating(file)
    import torch

    try:
        # A refused file also draws warnings from torch's unpickler (pickle protocol...): the
        # one-line error below says all there is, so they are shown only if the load works.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = torch.load(file, map_location="cpu", weights_only=True)
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    except Exception as err:  # torch raises many types for bad bytes; all mean "unusable"
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = "it holds objects other than tensors and plain data; refusing to unpickle them"
        else:
            reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a dnr-deploy checkpoint ({CHECKPOINT_FORMAT})")
    _check_layout(state, file)
    return state


def _check_not_inflating(file: Path) -> None:
    """torch.save stores its zip members uncompressed, so a checkpoint inflates to its own
    size; one whose members would inflate to much more is a zip bomb, refused unread.

    Raises:
        CheckpointError: members declaring more than twice the file's size (+ 1 MiB).
    """
    if not zipfile.is_zipfile(file):
        return  # torch.load tells what else it is
    try:
        with zipfile.ZipFile(file) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {reason}") from None
    limit = 2 * file.stat().st_size + (1 << 20)
    if inflated > limit:
        raise CheckpointError(f"checkpoint {str(file)!r} would inflate to {inflated:,} bytes, "
                              f"far beyond its {file.stat().st_size:,}; torch.save never "
                              "compresses, so this is not one of its files; refusing it")


# Top-level entries of a checkpoint and their types (save_checkpoint writes every one of them).
_LAYOUT = {"epoch": int, "config": dict, "model": dict, "optimizer": dict, "policy": dict,
           "rng": dict, "history": list}


def _check_layout(state: dict, file: Path) -> None:
    """Raises:
        CheckpointError: an entry missing or of the wrong type, or weights that are not
            tensors: a damaged checkpoint, or one written by something else."""
    for key, kind in _LAYOUT.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if key not in state else f"a {type(value).__name__}"
            raise CheckpointError(f"checkpoint {str(file)!r} is damaged: {key!r} is {found}, "
                                  f"expected a {kind.__name__}")
    if state["epoch"] < 0:
        raise CheckpointError(f"checkpoint {str(file)!r} is damaged: epoch {state['epoch']}")
    import torch

    bad = [name for name, tensor in state["model"].items()
           if not isinstance(name, str) or not isinstance(tensor, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(file)!r} is damaged: model entries "
                              f"{bad[:3]!r} are not named tensors")


def remember_latest(run_dir: Path) -> None:
    """Write LATEST beside the run (its folder's name, so the folder of runs can move): with
    the default `--out` that is runs/LATEST, which `latest_run` reads."""
    write_atomic(run_dir.parent / LATEST_POINTER.name,
                 lambda tmp: tmp.write_text(run_dir.name + "\n"))


def latest_run() -> Path:
    """The run dir that `dnr-compress` wrote last into runs/ (the default `--out`) or straight
    into this working directory (`--out NAME`), whichever LATEST is newer.

    LATEST is a file anyone can edit, so it may name only a real folder beside it: a bare
    name, never a path ("..", "/", an absolute one) or a symbolic link.

    Raises:
        CheckpointError: no run has been recorded here, or LATEST names anything else.
    """
    pointers = [p for p in (LATEST_POINTER, Path(LATEST_POINTER.name)) if p.is_file()]
    if not pointers:
        raise CheckpointError(
            f"no run dir given and no latest run recorded in {str(LATEST_POINTER)!r}; "
            "run dnr-compress first or name a run dir"
        )
    newest = max(pointers, key=lambda p: p.stat().st_mtime_ns)
    if newest.is_symlink():
        raise CheckpointError(f"{str(newest)!r} is a symbolic link; it must be the file "
                              "dnr-compress wrote")
    try:
        name = newest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {str(newest)!r}: {err}") from None
    run_dir = newest.parent / name
    if not plain_name(name) or run_dir.is_symlink() or not run_dir.is_dir():
        raise CheckpointError(
            f"{str(newest)!r} names {name[:80]!r}, which is not a run folder beside it (a bare "
            "name, no path, no link); name the run dir yourself")
    return run_dir


def read_run_json(run_dir: Path) -> dict:
    """run.json of a finished run.

    Raises:
        CheckpointError: not a finished run dir, or run.json is not valid JSON.
    """
    file = artifact_file(run_dir, RUN_JSON, CheckpointError)
    if not file.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a finished run dir (no {RUN_JSON})")
    data = read_json_object(file, "a run.json", CheckpointError)
    for key, valid in _RUN_JSON_TYPES.items():
        if key in data and not valid(data[key]):
            raise CheckpointError(f"{str(file)!r} is damaged: {key!r} is "
                                  f"{json.dumps(data[key])[:60]}; re-run dnr-compress")
    return data










# The types of the run.json entries later stages read (absent entries are the reader's call).
_RUN_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "config": lambda v: isinstance(v, dict) and isinstance(v.get("dataset", ""), str)
    and isinstance(v.get("data_dir"), str | None),
    "model": lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
    and is_count(v.get("num_classes")) and is_count(v.get("in_chans")),
    "input_shape": lambda v: isinstance(v, list) and len(v) == 3 and all(map(is_count, v)),
    "input_range": lambda v: are_numbers(v) and len(v) == 2,
    "num_classes": is_count,
    "mean": are_numbers,
    "std": lambda v: are_numbers(v, positive=True),
    "granularity": lambda v: isinstance(v, str),
    "threat_model": lambda v: isinstance(v, dict) and isinstance(v.get("norm", ""), str)
    and is_number(v.get("eps", 0)),
    "accuracy": lambda v: are_figures(v) and all(0 <= x <= 1 for x in v.values()),  # fractions
    "density": are_figures, "layer_densities": are_figures,
    "params": are_figures,
    "macs": are_figures,
    "checkpoint_sha256": lambda v: isinstance(v, str) and len(v) == 64,
}
