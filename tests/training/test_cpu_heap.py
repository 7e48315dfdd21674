"""retained_heap: freed training buffers stay in the heap inside the block, and go back to the
kernel on exit. Checked through the RSS of a fresh Python process (glibc Linux only): the pytest
process's heap carries whatever earlier tests left in it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.cpu_heap import _glibc, retained_heap

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = """
import json
import torch
from training.cpu_heap import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _glibc, retained_heap

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

def allocate_and_free(mib=256):  # touch `mib` MiB in 4 MiB tensors, then free them all
    blocks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(1) for _ in range(mib // 4)]
    del blocks

libc = _glibc()
# glibc's start-up state: every block over 128 KiB is mmapped, heap tops over 128 KiB trimmed
assert libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
allocate_and_free()  # first calls (kernels, thread pool) out of the way
libc.malloc_trim(0)
out = {"start": rss_mib()}
allocate_and_free()
out["control"] = rss_mib()
with retained_heap() as applied:
    out["applied"] = applied
    allocate_and_free()
    out["retained"] = rss_mib()
out["after"] = rss_mib()
print(json.dumps(out))
"""


def test_disabled_is_a_no_op():
    with retained_heap(False) as applied:
        assert applied is False


@pytest.mark.skipif(_glibc() is None, reason="mallopt / malloc_trim are glibc extensions")
def test_freed_memory_stays_inside_and_goes_back_to_the_kernel_on_exit():
    run = subprocess.run(
        [sys.executable, "-c", SCENARIO], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    rss = json.loads(run.stdout.splitlines()[-1])
    assert rss["applied"] is True
    assert rss["control"] - rss["start"] < 50, (
        rss
    )  # without the block, freed 4 MiB buffers are unmapped at once
    assert rss["retained"] - rss["start"] > 200, (
        rss
    )  # kept for the next step: touching it again costs no faults
    assert rss["retained"] - rss["after"] > 200, rss  # handed back on exit
