"""Keep freed memory in the process heap while training on CPU (glibc only).

A training step on CPU allocates and frees the same large buffers every step (activations, the
per-op bf16 copies of fp32 weights, gradients). glibc returns freed memory at the top of a heap to
the kernel once it exceeds its trim threshold, and serves blocks above its mmap threshold with a
fresh mmap each time; either way the next step touches new pages and pays a page fault (and a
zeroed page) per 4 KiB. Measured on the mini SD1.5 UNet in bf16, training in a worker thread as in
ComfyUI: 36 000-64 000 minor faults per step before, 5 000-12 000 inside `retained_heap`, and
2.31 -> 2.62 steps/s (medians of 3) with peak RSS within run-to-run spread. CUDA training does not
need this: PyTorch's CUDA caching allocator already keeps its blocks.

Inside the block the heap keeps what it has (trim threshold 1 GiB) and blocks up to 32 MiB come
from the heap, not from mmap (glibc's largest allowed threshold on 64-bit). On exit the freed
memory is handed back (`malloc_trim(0)`) and the thresholds are set to 32 / 64 MiB. glibc has no
way to return to its dynamic thresholds once they are set; 32 / 64 MiB is where that dynamic rule
ends up in a process that has freed a 32 MiB block, which loading any model does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
TRAINING_TRIM_THRESHOLD = 1 << 30
AFTER_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt and malloc_trim are glibc extensions)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # musl, macOS, Windows
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


@contextlib.contextmanager
def retained_heap(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the heap for the next step. Yields whether the
    setting took effect (False where the C library is not glibc, or when not enabled)."""
    libc = _glibc() if enabled else None
    applied = bool(
        libc is not None
        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
    )
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(_M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.malloc_trim(0)
