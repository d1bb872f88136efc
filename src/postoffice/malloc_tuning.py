"""glibc malloc told to keep the memory it frees for the next request.

Serving mail moves message bodies through short-lived ``bytes`` of 10 KiB to
a few MiB: an IMAP FETCH of ``BODY[]`` reads each file, converts it to CRLF
and holds a batch of them until the socket has taken it, then frees them all
at once.  With glibc's defaults the freed top of the heap (anything over
128 KiB) goes back to the kernel right away and the next batch faults the
same pages in again, zeroed: measured on ``BODY.PEEK[]`` of 10,000 x 10 KiB
(``bench/run.py`` row ``imap-10k-body-plain``), reading and converting a
message cost 11 us with the defaults and 7 us with the thresholds below, and
the server's CPU for the whole fetch fell by a fifth.

So freed memory up to ``TRIM_THRESHOLD`` stays in the process, and blocks up
to ``MMAP_THRESHOLD`` come from the heap instead of fresh ``mmap`` pages
(glibc's own dynamic threshold would grow there too, but setting one value
turns that off, so both are set).  The cost is memory the process keeps
after a burst, at most ``TRIM_THRESHOLD`` per malloc arena, never more than
its peak.  Elsewhere than glibc (musl, macOS) nothing changes.  A leaf
module (standard library only); ``app.serve`` calls ``tune`` once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 16 * 1024 * 1024
MMAP_THRESHOLD = 8 * 1024 * 1024


def tune() -> bool:
    """Set the thresholds; whether this C library took them."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt  # glibc only: AttributeError elsewhere
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        return bool(
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        )
    return False
