"""A resolver from fixed tables: the ``Resolver`` contract without a network.

For tests that need names but not a DNS server (mox keeps a mock resolver
for the same reason).  It answers the way ``DnsResolver`` does against a
server holding the same records: tests/integration/dns runs one contract
against both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from postoffice.dns.mx import MxRecord, normalise_host
from postoffice.dns.resolver import DnsError, SrvRecord, TlsaRecord

_VERSION = {"A": 4, "AAAA": 6}


class StaticResolver:
    """``mx`` maps domains to records, ``hosts`` names to addresses, ``txt``
    names to TXT records, ``ptr`` addresses to names, ``srv`` names to SRV
    records, ``tlsa`` "_<port>._tcp.<host>" names to TLSA records.  A name in
    none of the name tables does not exist; a name in ``failing`` fails for
    the moment (like a SERVFAIL or a timeout), and so does the PTR of an
    address there.  Answers for names in ``secure`` are authenticated (as if
    DNSSEC-signed and validated), all others insecure."""

    def __init__(
        self,
        mx: Mapping[str, Sequence[MxRecord]] | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
        failing: Sequence[str] = (),
        txt: Mapping[str, Sequence[str]] | None = None,
        ptr: Mapping[str, Sequence[str]] | None = None,
        srv: Mapping[str, Sequence[SrvRecord]] | None = None,
        tlsa: Mapping[str, Sequence[TlsaRecord]] | None = None,
        secure: Sequence[str] = (),
    ) -> None:
        self._mx = {normalise_host(k): list(v) for k, v in (mx or {}).items()}
        self._hosts = {normalise_host(k): list(v) for k, v in (hosts or {}).items()}
        self._txt = {normalise_host(k): list(v) for k, v in (txt or {}).items()}
        self._ptr = {_ip(k): [normalise_host(n) for n in v] for k, v in (ptr or {}).items()}
        self._srv = {normalise_host(k): list(v) for k, v in (srv or {}).items()}
        self._tlsa = {normalise_host(k): list(v) for k, v in (tlsa or {}).items()}
        self._failing = {normalise_host(n) for n in failing}
        self._secure = {normalise_host(n) for n in secure}

    def _lookup(self, name: str, rdtype: str) -> str:
        """``name`` as the tables hold it; DnsError as DnsResolver raises them."""
        key = normalise_host(name)
        if key in self._failing:
            raise DnsError(f"{key} {rdtype}: DNS servers failed", temporary=True)
        tables = (self._mx, self._hosts, self._txt, self._srv, self._tlsa)
        if not any(key in table for table in tables):
            raise DnsError(f"{key}: no such domain", temporary=False)
        return key

    async def mx(self, domain: str) -> list[MxRecord]:
        return list(self._mx.get(self._lookup(domain, "MX"), []))

    async def addresses(self, host: str) -> list[str]:
        try:
            name = self._lookup(host, "A")
        except DnsError as exc:
            if exc.temporary:
                raise
            return []
        found = self._hosts.get(name, [])
        return sorted(found, key=lambda a: ipaddress.ip_address(a).version, reverse=True)

    async def mx_dnssec(self, domain: str) -> tuple[list[MxRecord], bool]:
        return await self.mx(domain), normalise_host(domain) in self._secure

    async def addresses_dnssec(self, host: str) -> tuple[list[str], bool]:
        return await self.addresses(host), normalise_host(host) in self._secure

    async def tlsa(self, host: str, port: int) -> tuple[list[TlsaRecord], bool]:
        name = f"_{port}._tcp.{host}"
        try:
            key = self._lookup(name, "TLSA")
        except DnsError as exc:
            if exc.temporary:
                raise
            return [], False
        return list(self._tlsa.get(key, [])), key in self._secure

    async def txt(self, name: str) -> list[str]:
        return list(self._txt.get(self._lookup(name, "TXT"), []))

    async def ips(self, host: str, rdtype: str) -> list[str]:
        found = self._hosts.get(self._lookup(host, rdtype), [])
        return [a for a in found if ipaddress.ip_address(a).version == _VERSION[rdtype]]

    async def ptr(self, ip: str) -> list[str]:
        key = _ip(ip)
        if key in self._failing:
            raise DnsError(f"{key} PTR: DNS servers failed", temporary=True)
        return list(self._ptr.get(key, []))

    async def srv(self, name: str) -> list[SrvRecord]:
        try:
            key = self._lookup(name, "SRV")
        except DnsError as exc:
            if exc.temporary:
                raise
            return []
        return list(self._srv.get(key, []))


def _ip(text: str) -> str:
    """An address in one spelling ("::0001" and "::1" are one key)."""
    return str(ipaddress.ip_address(text))
