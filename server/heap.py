"""Keep freed memory for the next call: big calls then reuse pages instead of faulting them in.

A call on a million-node graph allocates tens of megabytes of arrays (the
request's columns, values, gradients, the response's chunks) and frees them
at its end. glibc's allocator hands blocks that big back to the system
(``mmap``, and trimming the heap's top), so the next call faults every page
in again, zero-filled by the kernel: on a virtual machine about as long as
the call's arithmetic. ``retain_freed_memory`` raises both thresholds, so
that up to the configured amount of freed memory stays mapped for reuse.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["MMAP_THRESHOLD_MAX", "retain_freed_memory"]

log = logging.getLogger("micrograd.server")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""The largest block glibc will take from its heap rather than ``mmap`` (64-bit builds)."""


def retain_freed_memory(nbytes: int) -> bool:
    """Let this process keep up to ``nbytes`` of freed memory mapped (glibc only); whether the
    allocator took the setting. ``0`` leaves the allocator's defaults."""
    if nbytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    limit = min(nbytes, (1 << 31) - 1)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, min(limit, MMAP_THRESHOLD_MAX)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, limit)) and ok
    if not ok:
        log.debug("the C library did not take retained_heap_bytes=%d", nbytes)
    return ok
