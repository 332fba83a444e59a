"""A memory budget for one call, so a runaway computation ends in an error, not an OOM kill.

torch-pruning's index propagation (`DependencyGraph.get_pruning_group`) can grow without bound:
on torchvision's swin_v2_t, one group of its single conv took 268 s and 10.9 GB on this machine,
and on swin_v2_b the kernel killed the process at 19.4 GB. Python has no per-call memory limit
(RLIMIT_AS counts the whole process's address space, not what one call allocates), so a watchdog
thread polls the resident size and interrupts the caller.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STATM = Path("/proc/self/statm")


class MemoryBudgetExceeded(Exception):  # noqa: N818  (an event, like StopIteration)
    """The guarded call grew the process past its budget."""


def resident_bytes() -> int | None:
    """The process's resident memory (Linux /proc), None where that cannot be read."""
    try:
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def memory_budget(extra_bytes: int, poll_seconds: float = 0.1) -> Iterator[None]:
    """Raise `MemoryBudgetExceeded` inside the block once the process's resident memory is more
    than `extra_bytes` above what it was on entry.

    The watchdog signals the main thread (SIGUSR1), whose handler raises between two Python
    bytecodes: prompt in Python code such as torch-pruning's, late inside one long C call.
    Off the main thread, or where /proc cannot be read, the block runs unguarded.
    """
    start = resident_bytes()
    if start is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = threading.Event()
    armed.set()
    done = threading.Event()

    def raise_if_armed(signum, frame) -> None:
        if armed.is_set():
            armed.clear()  # one raise per block
            raise MemoryBudgetExceeded(f"grew past {extra_bytes / 2**30:.3g} GiB")

    def watch() -> None:
        while not done.wait(poll_seconds):
            now = resident_bytes()
            if now is not None and now - start > extra_bytes and armed.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                return

    previous = signal.signal(signal.SIGUSR1, raise_if_armed)
    watchdog = threading.Thread(target=watch, name="memory-budget", daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        armed.clear()  # a signal still in flight is ignored from here on
        done.set()
        watchdog.join()
        signal.signal(signal.SIGUSR1, previous)
