"""Pure MX ordering (RFC 5321 §5.1, RFC 7505): no DNS, no I/O, no clock.

The resolver (``resolver.py``) fetches records; this module decides the order
in which the hosts are tried, so the rules can be tested with plain data.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    host: str  # lower case, no trailing dot; "" is the root (a null MX target)


class NullMx(Exception):
    """The domain publishes a null MX (RFC 7505): it accepts no mail at all."""


class MxLoopsToSelf(Exception):
    """Every usable MX is us or less preferred than us (RFC 5321 §5.1)."""


def normalise_host(name: str) -> str:
    """A DNS host name as compared here: lower case, without the trailing dot."""
    return name.rstrip(".").lower()


def order_mx(
    records: Iterable[MxRecord],
    rng: random.Random,
    *,
    self_names: Sequence[str] = (),
) -> list[str]:
    """The MX hosts to try, best first.

    RFC 5321 §5.1: lower preference first, hosts of equal preference in random
    order (to spread load).  RFC 7505 §3: a single record with the root as
    target is a null MX: raise NullMx.  A root target among other records
    violates §3 ("MUST NOT advertise any other MX") and is ignored as
    unusable.  If one of ``self_names`` (our own host names) is an MX, it and
    every host of equal or higher preference value are dropped so mail never
    loops back to us; nothing left raises MxLoopsToSelf.

    An empty result means the domain has no MX records at all: the caller
    then uses the domain itself as the implicit MX (RFC 5321 §5.1).
    """
    items = [MxRecord(r.preference, normalise_host(r.host)) for r in records]
    if not items:
        return []
    real = [r for r in items if r.host]
    if not real:
        raise NullMx
    mine = {normalise_host(n) for n in self_names}
    own = [r.preference for r in real if r.host in mine]
    if own:
        cutoff = min(own)
        real = [r for r in real if r.preference < cutoff]
        if not real:
            raise MxLoopsToSelf
    by_pref: dict[int, list[str]] = {}
    for r in real:
        hosts = by_pref.setdefault(r.preference, [])
        if r.host not in hosts:
            hosts.append(r.host)
    ordered: list[str] = []
    seen: set[str] = set()
    for pref in sorted(by_pref):
        group = by_pref[pref]
        rng.shuffle(group)
        for host in group:
            # A host listed twice at different preferences is tried once, at its best.
            if host not in seen:
                seen.add(host)
                ordered.append(host)
    return ordered
