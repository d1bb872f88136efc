"""What every child process of the server does first: tie its life to the server's.

The server starts children of two kinds: its extra smtp processes
(workers.py) and the DKIM verifier processes (policy/cpu_workers.py).  Each
must die with the server however the server ends, ``kill -9`` included, so
nothing keeps a port, a journal or a mailbox lock behind it.  A leaf module
(standard library only), so any layer's children may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(parent: int) -> None:
    """Be killed when ``parent`` exits, however it exits (Linux; elsewhere the
    child notices its parent is gone at the next check)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it went before the signal was armed
        os._exit(1)
