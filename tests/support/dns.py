"""A real DNS server for the mail-authentication tests.

Builds on ``tests.support.peers.Dnsmasq`` (Debian's dnsmasq on a loopback
port, authoritative for ``.test``; other names are REFUSED, which a
resolver sees as a temporary failure) and adds TXT and PTR records to its
command line.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from postoffice.config.settings import ListenAddress
from postoffice.dns.resolver import DnsResolver
from tests.support.peers import Dnsmasq


def auth_dns(
    root: Path,
    *,
    txt: Mapping[str, str | Sequence[str]] | None = None,
    hosts: Mapping[str, Sequence[str]] | None = None,
    mx: Iterable[tuple[str, str, int]] = (),
    ptr: Mapping[str, str] | None = None,
    null_mx: Iterable[str] = (),
    srv: Iterable[tuple[str, str, int, int]] = (),
) -> Dnsmasq:
    """A dnsmasq (not started) serving these records; several values for one
    TXT name make several records; ``srv``: (name, target, port, priority).  dnsmasq splits values longer than 255."""
    server = Dnsmasq(root, mx=mx, hosts=dict(hosts or {}), null_mx=null_mx)
    for name, values in (txt or {}).items():
        for value in [values] if isinstance(values, str) else values:
            if "," in value:  # dnsmasq would split the value there
                raise ValueError(f"TXT values cannot contain commas here: {value!r}")
            server.args.append(f"--txt-record={name},{value}")
    for address, target in (ptr or {}).items():
        server.args.append(f"--ptr-record={address},{target}")
    for name, target, port, priority in srv:  # target "": not offered (RFC 2782 ".")
        value = f"{name},{target},{port},{priority},1" if target else name
        server.args.append(f"--srv-host={value}")
    return server


def resolver_for(server: Dnsmasq, lifetime: float = 5.0) -> DnsResolver:
    return DnsResolver([ListenAddress("127.0.0.1", server.port)], lifetime=lifetime)


def start_keeping_port(server: Dnsmasq, attempts: int = 20) -> Dnsmasq:
    """Start ``server`` on the port already written into configs.  ``start``
    moves to another port when that one was taken meanwhile (a client
    socket of another test, say); wait and try the same port again instead."""
    planned = server.port
    for _ in range(attempts):
        server.start()
        if server.port == planned:
            return server
        server.stop()
        server.port = planned
        server.args = [a for a in server.args if not a.startswith("--port=")]
        server.args.append(f"--port={planned}")
        time.sleep(0.5)
    raise RuntimeError(f"port {planned} stayed in use")
