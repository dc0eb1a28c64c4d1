"""Give freed weight buffers back to the operating system (glibc only).

Switching models frees and allocates buffers of many sizes. glibc serves a large allocation with
``mmap`` only until the first one is freed; then it raises its threshold, serves later ones from its
heap, and keeps what they free. A server that switches models for hours then grows by tens of MiB a
minute although the tiers' accounted bytes stay within budget (the soak measured +19% in two minutes).
Pinning the thresholds makes every buffer above 128 KiB its own mapping, returned when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def return_freed_memory_to_os(threshold: int = 128 << 10) -> bool:
    """Make glibc map every allocation of ``threshold`` bytes or more on its own and trim its heap
    above it. A process-wide setting: call it once, at server start-up. Returns False (and changes
    nothing) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
    if not ok:
        logger.warning("mallopt refused the thresholds: freed weight buffers may stay in the heap")
    return ok
