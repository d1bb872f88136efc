"""The key under which a client address is counted: its IPv4 address, or its IPv6 /64.

One subscriber usually gets a whole IPv6 /64 (RFC 6177 §2 recommends at
least that much per site, and SLAAC needs it), so a client can rotate
through 2^64 source addresses at will.  Counting IPv6 clients by exact
address would let each one defeat every per-address limit; counting by /64
treats the prefix as the one client it usually is.  IPv4-mapped IPv6
addresses (``::ffff:192.0.2.1``, as a dual-stack socket reports IPv4 peers)
count as the IPv4 address they carry.

Used by every per-client limit: the connection cap (net/listener.py) and the
login throttle (policy/throttle.py), so both see the same client.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPV6_PREFIX = 64


@lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """``"192.0.2.1"`` -> ``"192.0.2.1"``; ``"2001:db8::5"`` -> ``"2001:db8::/64"``.

    A text that is no IP address (a Unix socket, a test double) is its own key.
    """
    text = ip.split("%", 1)[0]  # a zone index (fe80::1%eth0) is no part of the address
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
