"""Process memory, for stages that must stay within a stated bound and benchmarks that report it: current
and peak resident set size (:func:`hwm_bytes` can be started over with :func:`reset_peak_rss`),
:class:`PeakMemory`, the highest use sampled while a block runs, and :func:`run_child_json`, a measurement in a
fresh Python process (whose memory is then its own)."""

from __future__ import annotations

import logging
import json
import os
import resource
import subprocess
import sys
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


def proc_bytes(path: str, key: str) -> int | None:
    """A ``key:  N kB`` line of a Linux ``/proc`` file (``/proc/meminfo``, ``/proc/self/status``) in bytes; None
    where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hwm_bytes() -> int:
    """Peak resident set size of this process since it started or since :func:`reset_peak_rss` (Linux ``VmHWM``;
    :func:`peak_rss_bytes` elsewhere)."""
    hwm = proc_bytes("/proc/self/status", "VmHWM")
    return hwm if hwm is not None else peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start :func:`hwm_bytes` over from the current RSS (Linux ``/proc/self/clear_refs``, value 5), so that it
    measures one phase of a process; False where the kernel does not allow it (the peak then includes before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child_json(module: str, args: list[str], *, timeout: float | None = None, what: str = "measurement") -> dict:
    """Run ``python -m module *args`` in a fresh process and return the JSON object its last stdout line holds.

    For a measurement whose memory must be its own (a fresh process starts from the libraries alone, and what
    it allocates is not mixed with the caller's heap). Raises :class:`RuntimeError` with the child's last
    error line when it fails, is killed (out of memory) or runs past ``timeout`` seconds.
    """
    from common.paths import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the {what} ran past {timeout:.0f} s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"the {what} failed ({'killed by signal ' + str(-proc.returncode) if proc.returncode < 0 else err})")
    return json.loads(lines[-1])


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
