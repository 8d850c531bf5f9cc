"""Giving memory that queued work freed back to the operating system.

Request bodies and embeddings tensors are large, short-lived allocations. glibc
serves them from its heap once its mmap threshold has grown past their size, and a
freed heap is not returned: after a burst of large requests was cancelled, the
server kept gigabytes it no longer used. `malloc_trim` hands the free pages back;
the engine calls it whenever the work it held has shrunk by `every` bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

MIB = 1024 * 1024


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def trim() -> bool:
    """Return free heap pages to the OS (glibc only; elsewhere a no-op that says False)."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


class Trimmer:
    """Calls `trim` each time the bytes held have fallen by `every` since the last high-water mark."""

    def __init__(self, every: int = 64 * MIB):
        self.every, self.high = every, 0

    def observe(self, held: int) -> bool:
        if held >= self.high:
            self.high = held
            return False
        if self.high - held < self.every:
            return False
        self.high = held
        return trim()
