"""Keep freed memory in the process for the next scan step.

A scan step allocates the same large activations (for NC on a 24x24 model,
10 classes x 32 images: 12 MB per feature map) and frees them again. glibc's
malloc serves blocks that large from fresh ``mmap`` pages and trims the heap
when they are freed, so every step pays a page fault per 4 KiB of every
activation, which on the VMs we measure can cost more than computing it. In
``benchmarks/bench_scanners.py`` a full batched NC scan of the zoo's
``badnets-cnn-grey`` took 4.9-5.8 s on 2 threads with malloc as it is and
4.5-4.7 s with freed memory kept (docs/scanners.md, "The model's own
speed"). :func:`keep_freed_memory` raises malloc's mmap threshold to its
maximum (32 MiB) and its trim threshold to 1 GiB: the process keeps up to that
much freed memory for reuse instead of returning it to the system.

Every scan calls it (``Scanner.scan``; it acts once per process); set the
environment variable ``TRIGSCAN_KEEP_FREED_MEMORY=0`` to leave malloc as it
is. Only glibc (Linux) has these settings; elsewhere nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set malloc's thresholds once per process (see the module docstring).
    Returns whether they are set: False when disabled by the environment or
    when the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = os.environ.get("TRIGSCAN_KEEP_FREED_MEMORY", "1") != "0" and _mallopt()
    return _applied


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
