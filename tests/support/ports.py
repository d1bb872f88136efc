"""Free loopback ports for the servers and peers a test starts.

The one port picker of the test suite: ``PostofficeServer``, dnsmasq,
smtp-sink, the scripted MTA and the in-process harness all take their ports
here, so no two of them are handed the same one in a run.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable

# Below Linux's ephemeral range (32768-60999): a port picked here cannot be
# taken by some outgoing connection before its server binds it (a port from
# bind(0) once was: "address already in use" at start).  Never handed out
# twice in one test run, as nothing holds a picked port until it is bound.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port(hosts: Iterable[str] = ("127.0.0.1",), kind: int = socket.SOCK_STREAM) -> int:
    """A port free on every one of ``hosts`` for sockets of ``kind``
    (``socket.SOCK_DGRAM`` for a DNS server)."""
    hosts = list(hosts)
    for _ in range(500):
        port = random.randint(*PORT_RANGE)
        if port in _handed_out:
            continue
        try:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, kind) as s:
                    s.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port in the test range")
