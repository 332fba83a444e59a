"""Run-dir files: atomic writes, safe loading, and the pointer to the latest run.

Every file is written to a temporary name in its own folder and renamed when complete, so a crash
or Ctrl-C leaves either the old file or the new one, never half of one. Checkpoints load with
`weights_only=True`: a checkpoint is data, and a file from elsewhere never runs code here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "dnr-deploy/checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
RUN_JSON = "run.json"
METRICS_JSONL = "metrics.jsonl"
LATEST_POINTER = Path("runs") / "LATEST"  # relative to the working directory


class CheckpointError(ValueError):
    """A checkpoint or run dir that cannot be used (missing, corrupt, wrong format)."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary file beside `path`, flush it to disk, then rename it
    onto `path`.

    A process killed at any moment (SIGKILL included) leaves `path` either as it was or
    complete. What it can leave behind is the temporary file, `.NAME.*.tmp`: no reader opens
    it, and `remove_stale_temps` deletes those of a run dir when the run is resumed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync(tmp)  # the data reaches the disk before the name does (power loss, not kill)
        os.replace(tmp, path)
        if os.name == "posix":
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete the temporary files `write_atomic` leaves in `folder` when its process is
    killed mid-write (".checkpoint.pt.*.tmp", ...). Call it only where no other process is
    writing: a resumed run's own dir. Returns the names removed."""
    removed = []
    for tmp in Path(folder).glob(".*.*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomic(path, lambda tmp: tmp.write_text(lines))


def save_checkpoint(run_dir: Path, state: dict) -> None:
    state = {"format": CHECKPOINT_FORMAT, **state}
    write_atomic(run_dir / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without unpickling code.

    Raises:
        CheckpointError: missing, unreadable, truncated, or not a dnr-deploy checkpoint.
    """
    file = resolve_checkpoint(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {str(file)!r}")
    _check_not_inflating(file)
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
    bad = [name for name, tensor in state["model"].items()
           if not isinstance(name, str) or not isinstance(tensor, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(file)!r} is damaged: model entries "
                              f"{bad[:3]!r} are not named tensors")


def remember_latest(run_dir: Path) -> None:
    write_atomic(LATEST_POINTER, lambda tmp: tmp.write_text(str(run_dir.resolve()) + "\n"))


def latest_run() -> Path:
    """The run dir that `dnr-compress` wrote last from this working directory.

    Raises:
        CheckpointError: no run has been recorded here.
    """
    if not LATEST_POINTER.is_file():
        raise CheckpointError(
            f"no run dir given and no latest run recorded in {str(LATEST_POINTER)!r}; "
            "run dnr-compress first or name a run dir"
        )
    return Path(LATEST_POINTER.read_text().strip())


def read_run_json(run_dir: Path) -> dict:
    """run.json of a finished run.

    Raises:
        CheckpointError: not a finished run dir, or run.json is not valid JSON.
    """
    file = Path(run_dir) / RUN_JSON
    if not file.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a finished run dir (no {RUN_JSON})")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, 5000 digits
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{str(file)!r} nests too deeply to be a run.json") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r} does not hold a JSON object")
    for key, valid in _RUN_JSON_TYPES.items():
        if key in data and not valid(data[key]):
            raise CheckpointError(f"{str(file)!r} is damaged: {key!r} is "
                                  f"{json.dumps(data[key])[:60]}; re-run dnr-compress")
    return data


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _numbers(value: Any, positive: bool = False) -> bool:
    return isinstance(value, list) and bool(value) and all(
        _number(v) and math.isfinite(v) and (v > 0 or not positive) for v in value)


def _figures(value: Any) -> bool:
    return isinstance(value, dict) and all(_number(v) for v in value.values())


# The types of the run.json entries later stages read (absent entries are the reader's call).
_RUN_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "config": lambda v: isinstance(v, dict) and isinstance(v.get("dataset", ""), str)
    and isinstance(v.get("data_dir"), str | None),
    "model": lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)
    and _count(v.get("num_classes")) and _count(v.get("in_chans")),
    "input_shape": lambda v: isinstance(v, list) and len(v) == 3 and all(map(_count, v)),
    "input_range": lambda v: _numbers(v) and len(v) == 2,
    "num_classes": _count,
    "mean": _numbers,
    "std": lambda v: _numbers(v, positive=True),
    "granularity": lambda v: isinstance(v, str),
    "threat_model": lambda v: isinstance(v, dict) and isinstance(v.get("norm", ""), str)
    and _number(v.get("eps", 0)),
    "accuracy": _figures, "density": _figures, "layer_densities": _figures, "params": _figures,
    "macs": _figures,
    "checkpoint_sha256": lambda v: isinstance(v, str) and len(v) == 64,
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
