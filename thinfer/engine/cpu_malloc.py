"""glibc malloc settings that keep CPU decoding off the kernel's page-fault path.

The CPU decode path allocates and frees a few tensors of the context's size every layer of
every step (gathered keys and values, attention scores). glibc serves blocks above its mmap
threshold with fresh `mmap` calls and gives the top of the heap back to the kernel above its
trim threshold; both thresholds move as the process allocates, and once the per-layer tensors
grow past them (about 1.1k tokens per sequence at batch 4 for SmolLM2) every allocation is a
system call plus a page fault per 4 KiB page it touches. Measured on the dev machine
(`decode_attention` at SmolLM2's shape, batch 4, contexts growing from 1000 to 1250 tokens as
in decoding): by default 97-123 page faults and 0.33 ms of system time per call with 2
threads (2.6 ms per call), up to 1666 faults and 4.0 ms with 1 thread (7.2 ms per call); with
the settings below, 0-1 faults and no system time (2.3 and 1.8 ms per call). The
full-cache decode curve fell from 50 to 15 tok/s there. Fixing the mmap threshold at its
maximum, the trim threshold high and padding heap growth (`mallopt`) keeps freed memory in
the process for reuse, at the cost of the process holding on to what it freed (up to the
trim threshold). All three are needed: setting any one of them also freezes glibc's dynamic
mmap threshold wherever it stands, possibly at its 128 KiB start, which made every
allocation an mmap (1662 faults per call in the measurement above).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger("thinfer")

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit; larger blocks still use mmap.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 1 * 2**30
TOP_PAD = 64 * 2**20

_tuned: bool | None = None


def tune_malloc_for_decode() -> bool:
    """Set glibc's mmap and trim thresholds and top pad (once per process); True if set.
    A no-op (False) where the C library is not glibc."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = [
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        mallopt(_M_TOP_PAD, TOP_PAD),
    ]
    _tuned = all(done)
    if not _tuned:
        logger.warning("mallopt refused a setting (%s); CPU decode may page-fault", done)
    return _tuned
