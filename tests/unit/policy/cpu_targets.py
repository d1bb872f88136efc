"""Functions the worker-process tests run in real worker processes
(policy/cpu_workers.py): ``(header, payload) -> bytes``."""

from __future__ import annotations

import os
import time


def pid(header: bytes, payload: bytes) -> bytes:
    """The worker's process id: which process did the job."""
    return str(os.getpid()).encode()


def echo(header: bytes, payload: bytes) -> bytes:
    return header + b"|" + payload


def spin(header: bytes, payload: bytes) -> bytes:
    """Burn CPU for ``header`` seconds (at most 120), as pow() on a hostile key would."""
    end = time.monotonic() + min(float(header), 120.0)
    n = 0
    while time.monotonic() < end:
        n += 1
    return str(n).encode()


def fail(header: bytes, payload: bytes) -> bytes:
    raise ValueError("bad input")


def die(header: bytes, payload: bytes) -> bytes:
    os._exit(3)
