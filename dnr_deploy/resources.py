"""Machine limits that bound what a flag or an artifact may ask for: threads and memory.

A thread count or a batch size comes from the user (or a script fed by someone else), and an
artifact's graph decides how much memory a batch takes; both are checked against the machine
before anything is allocated, so an absurd request is one clear line instead of a hang or an
out-of-memory kill.

- Threads: at most `THREADS_PER_CPU` times the CPUs this process may run on
  (`os.sched_getaffinity`, else `os.cpu_count()`). More threads than cores only oversubscribe;
  the factor leaves room for experiments with oversubscription.
- Memory: what the kernel reports as available (`MemAvailable` in /proc/meminfo: free memory
  plus the page cache it can drop), of which a request may take `MEMORY_FRACTION`. Where that
  cannot be read (not Linux), `os.sysconf`'s free pages; failing that, no memory check.
"""

from __future__ import annotations

import os
from pathlib import Path

THREADS_PER_CPU = 4
MEMORY_FRACTION = 0.75  # the rest is left for the runtime's own buffers and everyone else
_MEMINFO = Path("/proc/meminfo")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The largest thread count bench and verify accept on this machine."""
    return THREADS_PER_CPU * usable_cpus()


def check_threads(threads: int, flag: str, error: type[Exception]) -> int:
    """Raises:
        error: `threads` below 1 or above `max_threads()`, naming the cap and why."""
    cap = max_threads()
    if not 1 <= threads <= cap:
        raise error(f"{flag} must be between 1 and {cap} ({THREADS_PER_CPU} x the "
                    f"{usable_cpus()} CPU(s) this process may use), got {threads}")
    return threads


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get without swapping, or None where it cannot be read."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def memory_budget_bytes() -> int | None:
    """What one request (a batch's inputs and activations, densified weights) may take."""
    available = available_memory_bytes()
    return None if available is None else int(MEMORY_FRACTION * available)


def gib(count: float) -> str:
    return f"{count / 2**30:.3g} GiB"


def check_fits(needed_bytes: int, what: str, advice: str, error: type[Exception]) -> None:
    """Raises:
        error: `needed_bytes` is more than `memory_budget_bytes()` (nothing allocated yet)."""
    available = available_memory_bytes()
    if available is None:
        return
    budget = int(MEMORY_FRACTION * available)
    if needed_bytes > budget:
        raise error(f"{what} needs about {gib(needed_bytes)} of memory, more than the "
                    f"{gib(budget)} it may use here ({MEMORY_FRACTION:.0%} of the "
                    f"{gib(available)} available); {advice}")
