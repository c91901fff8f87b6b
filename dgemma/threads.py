"""How many threads the `dgemma` command computes with, and how they wait for each other: chosen so that a shared
machine slows dgemma down in proportion, not tenfold.

Measured on 2 cores (`python scripts/threads_under_load.py`, docs/performance.md): with torch's defaults
(2 threads; libgomp spins 300,000 times before a waiting thread sleeps) `dgemma generate` on the bundled model
made 135 tok/s idle and 12 tok/s beside one busy process, because a thread that spins holds the core the thread
it waits for needs. One thread made 96 and 96; passive waiting 77 and 90; 10,000 spins 121 and 42.

The command's policy (a library user's process keeps torch's settings; DGEMMA_THREAD_POLICY=off keeps them for
the command too):
- threads: one per usable core that is idle when the command starts (the kernel's count of runnable processes),
  at least one. `--threads N` and OMP_NUM_THREADS set by the user win.
- waiting: with more than one thread, 10,000 spins before sleeping (GOMP_SPINCOUNT), so that a process that
  starts beside dgemma later costs it about a third of its speed, not nine tenths. OMP_WAIT_POLICY or
  GOMP_SPINCOUNT set by the user win.
libgomp reads its waiting policy once, when torch loads it, so the command calls `configure_waiting()` before it
imports torch; the thread count is set when a command starts (`choose_threads`).
"""

from __future__ import annotations

import os
import time

SPIN_COUNT = "10000"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.005) -> int:
    """Cores other processes keep busy now: runnable tasks besides this one (/proc/loadavg), the least of a few
    looks so that a blip does not count. 0 where the kernel does not say."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as status:
                running = int(status.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(running - 1)
        time.sleep(interval)
    return max(0, min(counts))


def default_threads() -> int:
    return max(1, usable_cores() - busy_cores())


def configure_waiting() -> None:
    """Before torch starts: OpenMP threads spin SPIN_COUNT times, not 300,000, before they sleep."""
    if os.environ.get("DGEMMA_THREAD_POLICY", "").lower() != "off" and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def choose_threads(requested: int | None) -> int | None:
    """The thread count to give torch: `requested` if given, else one per idle core; None leaves torch's own
    choice (DGEMMA_THREAD_POLICY=off, or OMP_NUM_THREADS set by the user)."""
    if requested is not None:
        return requested
    if os.environ.get("DGEMMA_THREAD_POLICY", "").lower() == "off" or "OMP_NUM_THREADS" in os.environ:
        return None
    return default_threads()
