"""Helpers the tests share: run the CLI as a user would, check a clean failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout importable, one thread (two
    processes each spinning two OpenMP threads on a 2-core machine slow both down many times)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m dnr_deploy.cli ARGS` in `cwd` as a user would, capturing output."""
    env = cli_env()
    return subprocess.run(
        [sys.executable, "-m", "dnr_deploy.cli", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, code: int = 2) -> None:
    """One line on stderr, the expected exit code, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("dnr-"), lines[0]


def call(main, args: list[str], capsys) -> subprocess.CompletedProcess:
    """Run a console-script function in-process, captured like a subprocess."""
    try:
        code = main(args)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)
