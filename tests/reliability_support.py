"""What the reliability tests share: call a console script in-process and classify the outcome,
count the bad inputs each entry point got, make a manifest agree with a file changed on purpose.

A console script fed a bad file must end in one of two ways: a clean failure (exit code 2, one
line on stderr that starts with "PROG: error: ", no traceback) or, for a damaged file that is
still valid (a flipped byte in padding, a run.json key no stage reads), acceptance. Anything
else (a traceback, another exit code, several lines, a call that does not return within its
time limit) fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from dnr_deploy.deploydir.manifest import MANIFEST_NAME

# Entry point -> Counter(tried=..., clean=..., accepted=...), summed over the whole session and
# printed at its end (and kept in .pytest_cache, key dnr_reliability/fuzz_counts).
COUNTS: dict[str, Counter] = defaultdict(Counter)


class Accepted(Exception):
    """Raised by a stub where the real work (training, building artifacts) would start: the
    input got through every check before it."""


class Hang(BaseException):
    """A call that did not return within its time limit (BaseException: nothing catches it)."""


@dataclass
class Outcome:
    code: int | None  # None: accepted (a stub raised Accepted)
    err: str
    out: str

    @property
    def accepted(self) -> bool:
        return self.code in (None, 0)


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def working_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def call_main(main, argv: list[str], seconds: float = 60) -> Outcome:
    """Run a console-script function as the shell would, capturing stdout and stderr."""
    err, out = io.StringIO(), io.StringIO()
    code: int | None
    with time_limit(seconds), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exit_info:  # argparse
            code = exit_info.code
        except Accepted:
            code = None
    # A warning that escapes reaches the user's terminal as more lines on stderr.
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return Outcome(code, err.getvalue() + shown, out.getvalue())


def check_outcome(entry: str, prog: str, outcome: Outcome) -> None:
    """Count the input for `entry` and assert it failed cleanly or was accepted."""
    COUNTS[entry]["tried"] += 1
    if outcome.accepted:
        COUNTS[entry]["accepted"] += 1
        return
    assert_clean_error(outcome.code, outcome.err, prog)
    COUNTS[entry]["clean"] += 1


def assert_clean_error(code: int | None, err: str, prog: str, expected: int = 2) -> str:
    assert "Traceback" not in err, err
    assert code == expected, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def record_api(entry: str, accepted: bool) -> None:
    """Count one input to a Python-API entry point (the caller asserted the error class)."""
    COUNTS[entry]["tried"] += 1
    COUNTS[entry]["accepted" if accepted else "clean"] += 1


def format_counts() -> list[str]:
    lines = [f"{'entry point':<34}{'tried':>7}{'failed cleanly':>16}{'accepted':>10}"]
    for entry in sorted(COUNTS):
        c = COUNTS[entry]
        lines.append(f"{entry:<34}{c['tried']:>7}{c['clean']:>16}{c['accepted']:>10}")
    return lines


def rehash(deploy_dir: Path, name: str) -> None:
    """Make the manifest agree with a file changed on purpose: a hostile but self-consistent
    deploy dir, so the file itself reaches its reader instead of failing the sha256 check."""
    from dnr_deploy.compress.checkpoint import sha256_of

    path = deploy_dir / MANIFEST_NAME
    info = json.loads(path.read_text())
    file = deploy_dir / name
    info["files"][name] = {"bytes": file.stat().st_size, "sha256": sha256_of(file)}
    path.write_text(json.dumps(info, indent=2))

