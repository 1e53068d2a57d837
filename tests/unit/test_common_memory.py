"""Memory readings track real allocations (RSS of this process; CUDA is a GPU test's business)."""

import time

from common.memory import PeakMemory, peak_rss_bytes, rss_bytes

MIB = 2**20


def test_rss_reads_an_allocation():
    before = rss_bytes()
    block = b"\x01" * (64 * MIB)  # written, so resident
    assert rss_bytes() - before > 48 * MIB
    assert peak_rss_bytes() >= rss_bytes() - MIB
    del block


def test_peak_memory_catches_a_freed_allocation():
    with PeakMemory(interval_s=0.002) as mem:
        block = b"\x01" * (96 * MIB)
        time.sleep(0.05)  # several samples while it is resident
        del block
        time.sleep(0.02)
    assert mem.rise_mib > 64, mem.rise_mib
    assert mem.peak_mib - mem.start_mib == mem.rise_mib
    assert mem.peak >= mem.start > 0
    assert mem.now() < mem.peak  # freed before the end: only the sampler saw it


def test_peak_memory_is_reusable():
    mem = PeakMemory(interval_s=0.002)
    for _ in range(2):
        with mem:
            pass
        assert 0 <= mem.rise_mib < 16
