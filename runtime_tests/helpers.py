"""Helpers of the runtime suite: run a console script as a user would, check a clean failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    """`python -m dnr_deploy.cli ARGS` in `cwd`, output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dnr_deploy.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, code: int = 2) -> None:
    """Exit `code`, one line on stderr naming the script, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dnr-"), result.stderr
    assert "Traceback" not in result.stderr
