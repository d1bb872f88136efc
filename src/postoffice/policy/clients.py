"""A client's address, read one way for every decision taken by it.

Peers arrive as the socket's text: ``"192.0.2.1"``, ``"2001:db8::5"``,
``"::ffff:192.0.2.1"`` (an IPv4 client on a dual-stack socket),
``"fe80::1%eth0"`` (a scoped address), or anything at all from a Unix
socket or a test double.  ``client_address`` turns that into the address
that counts, the zone dropped and an IPv4-mapped address unwrapped, so
that the plaintext-login rule (``is_loopback``), the networks exempt from
the inbound checks (``in_networks``) and every per-client limit
(``client_key``) see the same client.

The counting key: one subscriber usually gets a whole IPv6 /64 (RFC 6177
§2 recommends at least that much per site, and SLAAC needs it), so a client
can rotate through 2^64 source addresses at will.  Counting IPv6 clients by
exact address would let each one defeat every per-address limit; counting
by /64 treats the prefix as the one client it usually is.  The connection
cap (net/listener.py) and the login throttle (policy/throttle.py) count by
it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPV6_PREFIX = 64

ClientAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(ip: str) -> ClientAddress | None:
    """The address ``ip`` names, IPv4-mapped ones as IPv4; None for no IP address."""
    text = ip.split("%", 1)[0]  # a zone index (fe80::1%eth0) is no part of the address
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(ip: str) -> bool:
    """True for a client on this machine (127.0.0.0/8, ::1, and either mapped)."""
    address = client_address(ip)
    return address is not None and address.is_loopback


def in_networks(address: ClientAddress, networks: Iterable[Network]) -> bool:
    """True if ``address`` is in one of ``networks`` (e.g. ``[checks] exempt_networks``)."""
    return any(address.version == net.version and address in net for net in networks)


@lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """``"192.0.2.1"`` -> ``"192.0.2.1"``; ``"2001:db8::5"`` -> ``"2001:db8::/64"``.

    A text that is no IP address (a Unix socket, a test double) is its own key.
    """
    address = client_address(ip)
    if address is None:
        return ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))


def may_send_password(tls: bool, client_ip: str, allow_plaintext_loopback: bool) -> bool:
    """Whether a client may send a password now (every protocol asks this):
    inside TLS, or in plaintext from this machine when ``[auth]
    allow_plaintext_loopback`` says so (RFC 4954 §4, RFC 2595 §2.2)."""
    return tls or (allow_plaintext_loopback and is_loopback(client_ip))
