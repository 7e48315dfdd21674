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


class _RecordingLibc:
    """Stands in for glibc: records mallopt / malloc_trim calls; mallopt answers `answer`."""

    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return self.answer

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.mark.parametrize("answer", [1, 0])
def test_settings_inside_and_after_the_block(monkeypatch, answer):
    """The exact glibc calls: inside, blocks up to 32 MiB from the heap and a 1 GiB trim threshold;
    on exit (also when mallopt refused, answer 0), 64 / 32 MiB thresholds and a full trim."""
    import training.cpu_heap as cpu_heap

    libc = _RecordingLibc(answer)
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: libc)
    mmap, trim = -3, -1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD in glibc's <malloc.h>
    with retained_heap() as applied:
        assert applied is bool(answer)
        inside = list(libc.calls)
    expected_inside = [("mallopt", mmap, 32 << 20), ("mallopt", trim, 1 << 30)][: 2 if answer else 1]
    assert inside == expected_inside
    assert libc.calls[len(inside) :] == [
        ("mallopt", trim, 64 << 20),
        ("mallopt", mmap, 32 << 20),
        ("malloc_trim", 0),
    ]


def test_the_block_restores_the_heap_when_the_step_fails(monkeypatch):
    import training.cpu_heap as cpu_heap

    libc = _RecordingLibc()
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError, match="boom"), retained_heap():
        raise RuntimeError("boom")
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_disabled_never_touches_the_c_library(monkeypatch):
    import training.cpu_heap as cpu_heap

    monkeypatch.setattr(cpu_heap, "_glibc", lambda: pytest.fail("_glibc called while disabled"))
    with retained_heap(False) as applied:
        assert applied is False


@pytest.mark.skipif(_glibc() is None, reason="mallopt / malloc_trim are glibc extensions")
def test_glibc_is_found_with_typed_arguments():
    import ctypes

    libc = _glibc()
    assert libc.mallopt.argtypes == [ctypes.c_int, ctypes.c_int]
    assert libc.malloc_trim.argtypes == [ctypes.c_size_t]


def test_a_c_library_without_the_glibc_extensions_is_not_used(monkeypatch):
    import ctypes

    import training.cpu_heap as cpu_heap

    class Musl:
        def mallopt(self, *a):  # no gnu_get_libc_version, no malloc_trim
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Musl())
    assert cpu_heap._glibc() is None

    def no_libc(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert cpu_heap._glibc() is None
