"""What reaches the terminal: progress lines on stderr, the one switch that silences them
(--quiet, --json), and `terminal_safe`, which every printer passes its text through. Torch-free,
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
    return lambda line: print(terminal_safe(f"{prefix}{line}"), file=sys.stderr, flush=True)


def terminal_safe(text: object) -> str:
    """`text` with every character a terminal would act on written as its escape (ESC as
    `\\x1b`, a bidi override as `\\u202e`): everything not printable but line breaks and tabs.
    Class names, model specs, paths and messages come from artifacts, which are untrusted; an
    escape sequence in one must not recolour, rewrite or hide what the console shows."""
    return "".join(char if char.isprintable() or char in "\n\t" else repr(char)[1:-1]
                   for char in str(text))
