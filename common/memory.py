"""Process memory, for stages that must stay within a stated bound: current and peak resident set size."""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger(__name__)

_LOUD_BYTES = 1 << 30  # phase lines are INFO once the process holds more than this, DEBUG below


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def log_memory(label: str, logger: logging.Logger | None = None) -> tuple[int, int]:
    """Log ``label`` with the current and peak RSS (GiB); returns ``(rss, peak)`` in bytes."""
    rss, peak = rss_bytes(), peak_rss_bytes()
    level = logging.INFO if peak > _LOUD_BYTES else logging.DEBUG
    (logger or log).log(level, "%s: RSS %.2f GiB (peak %.2f GiB)", label, rss / 2**30, peak / 2**30)
    return rss, peak


def release_to_os() -> None:
    """Return freed heap memory to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    After a big model is freed, glibc keeps many of its pages in the process's arenas (its mmap threshold
    grows with each large free), so RSS, and what the next stage can use, does not drop without this.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
