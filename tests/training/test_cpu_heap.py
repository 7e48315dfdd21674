"""retained_heap: freed training buffers stay in the heap inside the block, and go back to the
kernel on exit. Checked through the RSS of this process (glibc Linux only)."""

import pytest
import torch

from training.cpu_heap import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc, retained_heap

LIBC = _glibc()
glibc_only = pytest.mark.skipif(LIBC is None, reason="mallopt / malloc_trim are glibc extensions")


def _allocate_and_free(mib: int = 256) -> None:
    """Touch `mib` MiB in 4 MiB tensors, then free them all."""
    blocks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(1) for _ in range(mib // 4)]
    del blocks


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _small_thresholds() -> None:
    """glibc's start-up state: every block over 128 KiB is mmapped, heap tops over 128 KiB trimmed."""
    assert LIBC.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
    assert LIBC.mallopt(_M_TRIM_THRESHOLD, 128 << 10)


def test_disabled_is_a_no_op():
    with retained_heap(False) as applied:
        assert applied is False


@glibc_only
def test_freed_memory_stays_inside_and_goes_back_to_the_kernel_on_exit():
    _small_thresholds()
    LIBC.malloc_trim(0)  # free memory left by earlier tests stops being resident, so reuse shows in RSS
    start = _rss_mib()
    _allocate_and_free()
    assert _rss_mib() - start < 50  # the control: without the block, freed 4 MiB buffers are unmapped at once
    with retained_heap() as applied:
        assert applied is True
        _allocate_and_free()
        retained = _rss_mib()
        assert retained - start > 200  # kept for the next step: touching it again costs no page faults
    after = _rss_mib()
    assert retained - after > 200, (start, retained, after)
