"""A private network namespace for one test: IPv6 addresses of our own on loopback.

``private_network`` moves the calling thread into a new, empty network
namespace (unshare(2) with CLONE_NEWNET), brings its loopback up with the
given addresses, and moves the thread back when the block ends; the
namespace disappears with the last socket and process in it.  Processes
(the server) and threads started inside the block live in the namespace;
nothing the test does there can reach the machine's real network, and the
addresses it adds exist nowhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterable, Iterator

CLONE_NEWNET = 0x40000000


class NamespaceUnavailable(Exception):
    """unshare(2) was refused (no CAP_SYS_ADMIN here)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


@contextlib.contextmanager
def private_network(ip_program: str, addresses: Iterable[str]) -> Iterator[None]:
    """``addresses`` ("2001:db8:1:2::1/64", ...) on ``lo`` of a new namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise NamespaceUnavailable(os.strerror(ctypes.get_errno()))
        try:
            commands = [[ip_program, "link", "set", "lo", "up"]]
            # nodad: no duplicate address detection, so each address is usable at once.
            commands += [[ip_program, "addr", "add", a, "dev", "lo", "nodad"] for a in addresses]
            for command in commands:
                subprocess.run(command, check=True, capture_output=True, timeout=10)
            yield
        finally:
            _check(libc.setns(home, CLONE_NEWNET), "setns back to the test's namespace")
    finally:
        os.close(home)
