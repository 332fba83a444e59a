"""How long a user waits without seeing anything move (issue 16): run a shell command on a
pseudo-terminal (so progress lines that only show on terminals show) and print the longest
gaps between output chunks.

    python benchmarks/silence.py ".venv/bin/dnr-compress && .venv/bin/dnr-export --baseline &&
        .venv/bin/dnr-bench && .venv/bin/dnr-verify && .venv/bin/dnr-report"

Measured on this 2-core machine, idle-ish: the whole pipeline 396.6 s, longest silence 6.0 s
(the final evaluation's first APGD-CE batch). Written by hand because no maintained library times
gaps in a pty's output; `pty` and `termios` are the standard library's.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import termios
import time


def watch(command: str, top: int) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the pty as its terminal
        os.execvp("bash", ["bash", "-c", command])
    # a real size: tqdm draws nothing on a 0x0 terminal
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    start = last = time.monotonic()
    gaps: list[tuple[float, float, bytes]] = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        now = time.monotonic()
        gaps.append((now - last, now - start, chunk.strip()[-100:]))
        last = now
    _, status = os.waitpid(pid, 0)
    print(f"exit {os.waitstatus_to_exitcode(status)}, total {time.monotonic() - start:.1f} s; "
          f"longest silences:")
    for gap, at, chunk in sorted(gaps, key=lambda g: -g[0])[:top]:
        print(f"  {gap:5.1f} s, ending at t={at:6.1f} s with: {chunk.decode(errors='replace')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", help="shell command to run on the pseudo-terminal")
    parser.add_argument("--top", type=int, default=8, help="how many gaps to print")
    args = parser.parse_args()
    watch(args.command, args.top)


if __name__ == "__main__":
    main()
