"""Progress lines on stderr, and the one switch that silences them (--quiet, --json). Torch-free,
so bench and the parsers can use it without loading torch."""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[str], None]

_silenced = False


def silence_progress() -> None:
    """No progress from here on in this process (the console scripts' --quiet and --json)."""
    global _silenced
    _silenced = True


def progress_silenced() -> bool:
    return _silenced


def terminal_progress(prefix: str) -> Progress | None:
    """A printer of progress lines to stderr when it is a terminal, else None: logs and the
    one-line error contract of the console scripts stay free of progress chatter."""
    if _silenced or not sys.stderr.isatty():
        return None
    return lambda line: print(f"{prefix}{line}", file=sys.stderr, flush=True)
