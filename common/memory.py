"""Process memory, for stages that must stay within a stated bound and benchmarks that report it: current
and peak resident set size, and :class:`PeakMemory`, the highest use sampled while a block runs."""

from __future__ import annotations

import logging
import os
import resource
import threading

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


class PeakMemory:
    """The highest memory in use while a ``with`` block runs, sampled by a thread every ``interval_s``:
    this process's resident set size (:func:`rss_bytes`), or with ``cuda=True`` the memory in use on the
    current CUDA device (all processes', from ``torch.cuda.mem_get_info``).

    ``start`` and ``peak`` are bytes (at entry, and the highest sample including entry and exit);
    :attr:`start_mib`, :attr:`peak_mib` and :attr:`rise_mib` (peak above start) are MiB. Sampling misses
    peaks shorter than the interval; the stages' ``ru_maxrss`` (:func:`peak_rss_bytes`) does not, but it
    never goes down, so it cannot measure one block after another.
    """

    def __init__(self, *, cuda: bool = False, interval_s: float = 0.005):
        self.cuda, self.interval_s = cuda, interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> int:
        """Bytes in use now (what one sample reads)."""
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            return total - free
        return rss_bytes()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = self.now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())

    @property
    def start_mib(self) -> float:
        return self.start / 2**20

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20

    @property
    def rise_mib(self) -> float:
        """How far the peak rose above the level at entry, MiB."""
        return (self.peak - self.start) / 2**20


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
