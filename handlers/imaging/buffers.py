"""Frame buffers of 4 MiB without a page fault each.

glibc serves an allocation above its mmap threshold with a fresh mmap and
returns it with munmap when freed, so every 4 MiB frame read or decompressed
costs a thousand page faults (measured: ~50k a GiB, 5-8 % of a capture's CPU).
For the length of a capture or a deploy the threshold is raised above the
frames' size and trimming is put off, so freed buffers are reused from the
heap; afterwards both go back to glibc's defaults and the heap is trimmed.
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 128 * 1024      # glibc's default for both
FRAME_CEILING = 64 << 20            # above any frame or run buffer of the engine
TRIM_LATER = 1 << 30


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def reusing_buffers(func):
    """Run ``func`` with big buffers reused from the heap (module docstring)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        libc = _glibc()
        if libc is None:
            return func(*args, **kwargs)
        libc.mallopt(M_MMAP_THRESHOLD, FRAME_CEILING)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_LATER)
        try:
            return func(*args, **kwargs)
        finally:
            libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
            libc.malloc_trim(0)
    return wrapper
