"""A client's verified host name (forward-confirmed reverse DNS).

Milters and hooks expect the name of the connecting host: Postfix hands
its milters ``{client_name}`` and the ``_`` macro built from a
forward-confirmed PTR lookup, "unknown" when it fails, and rspamd scores
on it (RDNS_NONE, HFILTER_HOSTNAME_UNKNOWN).  A bare PTR answer proves
nothing, since whoever owns the reverse zone writes what it likes, so a
name counts only when one of its own A/AAAA records leads back to the
client (FCrDNS, RFC 8601 §3's "iprev" method, as RFC 5451 called it).

The lookups cost one PTR and at most ``MAX_NAMES`` forward queries per
connection, bounded in time, and only where they are used: when filters
are configured and the client is outside ``[checks] exempt_networks``.
"""

from __future__ import annotations

import asyncio
import logging

from postoffice.dns.resolver import DnsError, Resolver
from postoffice.policy.clients import client_address

log = logging.getLogger("postoffice.dns")

MAX_NAMES = 5  # PTR names checked forward, at most (a hostile zone may list hundreds)
LOOKUP_TIMEOUT = 10.0  # seconds for the whole check; then the client is "unknown"


async def verified_client_name(resolver: Resolver, ip: str, timeout: float = LOOKUP_TIMEOUT) -> str:
    """The first PTR name of ``ip`` whose addresses include ``ip``; "" when
    there is none, DNS failed, or the check took over ``timeout`` seconds."""
    address = client_address(ip)
    if address is None:
        return ""
    try:
        async with asyncio.timeout(timeout):
            names = await resolver.ptr(str(address))
            for name in names[:MAX_NAMES]:
                try:
                    forward = await resolver.addresses(name)
                except DnsError:
                    continue
                if any(client_address(a) == address for a in forward):
                    return name.rstrip(".").lower()
    except (DnsError, TimeoutError) as exc:
        log.info("client %s: reverse DNS not verified: %s", ip, exc or "timed out")
    return ""
