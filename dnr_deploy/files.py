"""Safe files: atomic writes, sha256, guarded JSON reading, and publishing a finished folder.

Every file of a run dir or a deploy dir is written to a temporary name in its own folder and
renamed when complete, so a crash or Ctrl-C leaves either the old file or the new one, never
half of one; a deploy dir is built in a hidden sibling folder and renamed into place whole.
Both directory contracts (`checkpoint` for run dirs, `deploydir` for deploy dirs) use these.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: one policy, the umask's
        _fsync(tmp)  # the data reaches the disk before the name does (power loss, not kill)
        os.replace(tmp, path)
        if os.name == "posix":
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def artifact_file(folder: str | Path, name: str, error: type[Exception]) -> Path:
    """`folder/name`, checked to stay inside `folder`: the one gate every reader of a run dir
    or a deploy dir goes through (DESIGN.md section 9), so no artifact reads a file elsewhere.

    A name that does not exist is returned as it is (each reader says what is missing); one
    that exists must be a regular file, reached through no symbolic link, inside `folder`.

    Raises:
        error: the path is a symbolic link, leaves `folder` (through "..", an absolute name or
            a linked folder on the way), or is not a regular file.
    """
    path = Path(folder) / name
    if not os.path.lexists(path):
        return path
    if path.is_symlink():
        raise error(f"{str(path)!r} is a symbolic link; artifacts are read only as regular "
                    f"files inside {str(folder)!r}")
    real, home = path.resolve(), Path(folder).resolve()
    if home not in real.parents:
        raise error(f"{str(path)!r} lies outside {str(folder)!r} (it resolves to "
                    f"{str(real)!r}); artifacts are read only from inside the dir given")
    if not real.is_file():
        raise error(f"{str(path)!r} is not a regular file")
    return path


def plain_name(text: str) -> bool:
    """A bare folder or file name: no separator, not "." or "..", not absolute, no NUL; what
    a file may name when the name is joined to a folder the user gave."""
    return (bool(text) and text not in (".", "..") and "/" not in text and "\\" not in text
            and "\x00" not in text and not os.path.isabs(text))


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomic(path, lambda tmp: tmp.write_text(lines))


def describe_os_error(err: OSError, writing: str) -> str:
    """One line for a file-system error a stage did not expect: "cannot read PATH" when the
    file it names is missing or there but unreadable (permissions), else "cannot write
    WRITING" (a read-only or full disk under --out)."""
    name = err.filename
    unreadable = name is not None and os.path.lexists(name) and (
        not os.access(name, os.R_OK) or not os.stat(name).st_mode & 0o444)
    if name is not None and (err.errno == errno.ENOENT or unreadable):
        return f"cannot read {str(name)!r}: {err.strerror or err}"
    return f"cannot write {writing}: {err}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(file: Path, what: str, error: type[Exception]) -> dict:
    """A JSON object from `file`, or `error` with one line that names the file.

    Args:
        file: the path.
        what: what the file should be ("a run.json", "a manifest"), for the message.
        error: the exception type of the caller's contract (CheckpointError, ManifestError).
    """
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, 5000 digits
        raise error(f"cannot read {str(file)!r} as JSON: {err}") from None
    except RecursionError:
        raise error(f"{str(file)!r} nests too deeply to be {what}") from None
    if not isinstance(data, dict):
        raise error(f"{str(file)!r} does not hold a JSON object; not {what}")
    return data


def is_number(value: Any) -> bool:
    """A finite int or float (bool excluded). Python's JSON reads NaN, Infinity and 1e999 as
    floats, and a figure that feeds a gate must compare like a number: NaN passes every `<`."""
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and (isinstance(value, int) or math.isfinite(value))


def is_int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_count(value: Any) -> bool:
    """An int >= 1 (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def are_numbers(value: Any, positive: bool = False) -> bool:
    """A non-empty list of finite numbers (all > 0 with `positive`)."""
    return isinstance(value, list) and bool(value) and all(
        is_number(v) and (v > 0 or not positive) for v in value)


def are_figures(value: Any) -> bool:
    """A mapping of names to numbers (accuracies, densities, sizes)."""
    return isinstance(value, dict) and all(is_number(v) for v in value.values())


class FolderTaken(OSError):
    """The target of `publish_folder` was filled by someone else while this one was built."""


def publish_folder(work: Path, out: Path, force: bool,
                   replaceable: Callable[[Path], None] | None = None) -> None:
    """Give the finished folder `work` the usual file modes and rename it onto `out` whole.
    With `force`, `replaceable(out)` runs right before an occupied `out` is set aside (it
    raises to keep it), so what is deleted is what was checked, not what arrived meanwhile.

    Raises:
        FolderTaken: `out` was filled meanwhile (without `force`), or replaced by another
            forced publisher at the same moment; `work` is left for the caller to remove.
    """
    _open_permissions(work)
    _move_into_place(work, out, force, replaceable)


def _open_permissions(folder: Path) -> None:
    """Give the finished folder the umask's usual mode (mkdtemp makes it owner-only); its
    files already have theirs (`write_atomic`)."""
    os.chmod(folder, 0o777 & ~_umask())


def _move_into_place(work: Path, out: Path, force: bool,
                     replaceable: Callable[[Path], None] | None = None) -> None:
    """Rename the finished folder onto `out` in one step, so `out` is never partial.

    rename(2) replaces only an absent or empty folder and fails on a non-empty one: that is
    what makes two exports racing to the same `out` safe. The first rename wins; the other
    publisher fails with FolderTaken and leaves the winner's folder untouched, so `out` is never
    a mix of both. With `force`, an existing `out` is set aside first and deleted once the
    new one is in place (a crash between the two renames leaves it as `.NAME.old-*`).

    Raises:
        FolderTaken: `out` was filled while this export ran (without `force`), or another
            forced export replaced it at the same moment; this export's folder is dropped.
    """
    try:
        os.rename(work, out)
        return
    except OSError as err:
        if err.errno not in _OCCUPIED:
            raise
        if not force:
            raise FolderTaken(
                f"--out {str(out)!r} was filled while this export ran (another dnr-export?); "
                "it was left as it is and nothing was written; pass --force to replace it"
            ) from None
    if replaceable is not None:
        replaceable(out)
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(work, out)
    except OSError as err:
        if err.errno not in _OCCUPIED:
            os.rename(old, out)  # put the previous deploy dir back
            raise
        _remove(old)  # replaced anyway, by the export that won
        raise FolderTaken(f"another export replaced --out {str(out)!r} at the same moment; "
                          "its deploy dir was kept and this one dropped") from None
    _remove(old)


# What rename(2) reports when the target is taken: a non-empty folder, or not a folder.
_OCCUPIED = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
