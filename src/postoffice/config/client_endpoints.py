"""What a mail client should connect to, read from ``[listen]``: the one answer
every client-facing description shares (Thunderbird autoconfig, Microsoft
autodiscover, the Apple profile: net/autoconfig.py; the RFC 6186 SRV records:
doctor.py), so they can never disagree with each other or with the listeners.

Clients connect to the server's ``hostname`` (the name its certificate is
for), on the port of the listener's first address.  A listener that is off
is not offered.  Implicit TLS comes first (RFC 8314 §3.3: "MUAs SHOULD
prefer implicit TLS"), then STARTTLS; IMAP before POP3 (it keeps mail on
the server, for several devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from postoffice.config.settings import ListenSettings

Protocol = Literal["imap", "pop3", "smtp"]
Security = Literal["tls", "starttls"]

# (listener, protocol, security, RFC 6186 / RFC 8314 SRV service label,
# SRV priority).  Priorities: lower is preferred across the services of one
# kind (RFC 6186 §3.4 lets a client choose IMAP or POP3 by them); implicit
# TLS ranks before STARTTLS (RFC 8314 §5.1).
_LISTENERS: tuple[tuple[str, Protocol, Security, str, int], ...] = (
    ("imaps", "imap", "tls", "_imaps._tcp", 0),
    ("pop3s", "pop3", "tls", "_pop3s._tcp", 10),
    ("imap", "imap", "starttls", "_imap._tcp", 20),
    ("pop3", "pop3", "starttls", "_pop3._tcp", 30),
    ("submissions", "smtp", "tls", "_submissions._tcp", 0),
    ("submission", "smtp", "starttls", "_submission._tcp", 10),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    listener: str  # "imaps", "submission", ...
    protocol: Protocol
    security: Security
    host: str
    port: int
    srv_service: str  # "_imaps._tcp"
    srv_priority: int


def all_services() -> tuple[tuple[str, str], ...]:
    """(listener name, SRV service label) of every client service, on or off."""
    return tuple((name, label) for name, _p, _s, label, _prio in _LISTENERS)


def endpoints(listen: ListenSettings, hostname: str) -> list[Endpoint]:
    """The client endpoints that are on, best first within each protocol
    (incoming: IMAP/POP3; outgoing: SMTP)."""
    found = []
    for name, protocol, security, label, priority in _LISTENERS:
        addresses = getattr(listen, name)
        if addresses and addresses[0].port != 0:
            found.append(
                Endpoint(name, protocol, security, hostname, addresses[0].port, label, priority)
            )
    return found


def incoming(listen: ListenSettings, hostname: str) -> list[Endpoint]:
    return [e for e in endpoints(listen, hostname) if e.protocol != "smtp"]


def outgoing(listen: ListenSettings, hostname: str) -> list[Endpoint]:
    return [e for e in endpoints(listen, hostname) if e.protocol == "smtp"]
