"""Run-dir files: atomic writes, safe loading, and the pointer to the latest run.

Every file is written to a temporary name in its own folder and renamed when complete, so a crash
or Ctrl-C leaves either the old file or the new one, never half of one. Checkpoints load with
`weights_only=True`: a checkpoint is data, and a file from elsewhere never runs code here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
    """Call `write(tmp)` for a temporary file beside `path`, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad bytes; all mean "unusable"
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = "it holds objects other than tensors and plain data; refusing to unpickle them"
        else:
            reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {str(file)!r}: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a dnr-deploy checkpoint ({CHECKPOINT_FORMAT})")
    return state


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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(file)!r} does not hold a JSON object")
    return data


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
