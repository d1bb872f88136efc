"""DNS lookups behind one small interface, and its dnspython implementation.

``Resolver`` is every question the server asks: MX records and addresses
for outbound routing, TXT, A/AAAA and PTR for SPF, DKIM and DMARC (and the
doctor).  ``DnsResolver`` implements it with dnspython and honours
``[relay] dns_servers`` (SPEC: every lookup goes through them when set);
``static.StaticResolver`` is an in-memory table with the same contract.

Errors are split the way delivery needs them (RFC 5321 §5.1, §4.2.4):
a name that does not exist is permanent, anything else that went wrong
(timeouts, SERVFAIL, REFUSED) is temporary and the message is retried.

DNSSEC (for DANE, RFC 7672 §2.1): we do not validate ourselves.  Every
question goes out with the EDNS DO bit, and the ``*_dnssec`` lookups report
whether the answer came back with the AD bit, i.e. whether the validating
resolver in ``[relay] dns_servers`` (unbound on loopback, say) authenticated
it.  Three outcomes, as RFC 7672 §2.1.1 names them: "secure" (AD set),
"insecure" (no AD: no DANE), "bogus" (the validator answers SERVFAIL, a
temporary DnsError: delivery waits).  The AD bit is only as trustworthy as
the path to that resolver, so it should be on the same host (RFC 6698 §4.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from postoffice import metrics
from postoffice.config.settings import ListenAddress
from postoffice.dns.mx import MxRecord, normalise_host

DNS_LIFETIME = 20.0  # seconds for one lookup, all servers and retries included
DNS_CACHE_SIZE = 4096  # answers kept (each for its TTL)
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: signed answers fit without fragments


class DnsError(Exception):
    """A lookup failed.  ``temporary`` decides retry (True) or bounce (False)."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # normalised host name; "" for "."


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (RFC 6698 §2.1): certificate usage, selector,
    matching type, and the association data (raw bytes)."""

    usage: int
    selector: int
    mtype: int
    data: bytes


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[MxRecord]:
        """The MX records of ``domain``; [] when it exists but has none.
        Raise DnsError (permanent when the domain does not exist)."""
        ...

    async def addresses(self, host: str) -> list[str]:
        """IPv6 then IPv4 addresses of ``host``; [] when it has none or does
        not exist.  Raise DnsError(temporary=True) when DNS failed."""
        ...

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name``, each one's strings joined (RFC 7208
        §3.3, RFC 6376 §3.6.2.2); [] when it has none.  DnsError: permanent
        when the name does not exist, temporary when DNS failed."""
        ...

    async def ips(self, host: str, rdtype: str) -> list[str]:
        """The ``rdtype`` ("A" or "AAAA") addresses of ``host``; [] when it has
        none.  Unlike ``addresses``, a name that does not exist is a permanent
        DnsError (SPF counts it as a void lookup, RFC 7208 §4.6.4)."""
        ...

    async def ptr(self, ip: str) -> list[str]:
        """The names the reverse zone gives for ``ip``; [] when there are none
        (NXDOMAIN included).  DnsError(temporary=True) when DNS failed."""
        ...

    async def srv(self, name: str) -> list[SrvRecord]:
        """The SRV records of ``name`` (RFC 2782); [] when it has none or does
        not exist.  DnsError(temporary=True) when DNS failed.  A target of
        "" is RFC 2782's ".": the service is decidedly not offered."""
        ...

    async def mx_dnssec(self, domain: str) -> tuple[list[MxRecord], bool]:
        """``mx``, and whether the validating resolver authenticated the
        answer (the AD bit; an authenticated NODATA counts, RFC 7672 §2.2.1)."""
        ...

    async def addresses_dnssec(self, host: str) -> tuple[list[str], bool]:
        """``addresses``, and whether every answer among them was authenticated."""
        ...

    async def tlsa(self, host: str, port: int) -> tuple[list[TlsaRecord], bool]:
        """The TLSA records at ``_<port>._tcp.<host>`` (RFC 6698 §3), and
        whether they were authenticated; ([], ...) when there are none (NXDOMAIN
        included: RFC 7672 §2.2.2, no records means no DANE).  A SERVFAIL
        (bogus, say) is DnsError(temporary=True)."""
        ...


def _authenticated(answer: dns.resolver.Answer) -> bool:
    """The AD bit of the response behind ``answer`` (RFC 4035 §3.2.3)."""
    return bool(answer.response.flags & dns.flags.AD)


def _absolute(name: str) -> dns.name.Name:
    # Absolute names: no search list, so "example.test" never becomes
    # "example.test.corp.local".
    return dns.name.from_text(normalise_host(name) + ".")


class DnsResolver:
    """dnspython's async resolver, on ``servers`` or the system's."""

    def __init__(self, servers: Sequence[ListenAddress] = (), lifetime: float = DNS_LIFETIME):
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(s.host, s.port) for s in servers
            ]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        # The DO bit asks for DNSSEC records, so a validating resolver says
        # with the AD bit whether it authenticated the answer (RFC 3225, RFC 6840 §5.8).
        self._resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self._resolver.lifetime = lifetime
        self._resolver.timeout = min(lifetime, 5.0)
        # Answers are kept for their TTL, so a queue run to one domain asks once.
        self._resolver.cache = dns.resolver.LRUCache(DNS_CACHE_SIZE)

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None for NODATA; DnsError(temporary=False) for NXDOMAIN."""
        metrics.dns_lookup(rdtype)
        try:
            return await self._resolver.resolve(
                _absolute(name), rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            metrics.dns_failure(rdtype, "nxdomain")
            raise DnsError(f"{name}: no such domain", temporary=False) from None
        except dns.resolver.NoNameservers as exc:
            metrics.dns_failure(rdtype, "servfail")
            raise DnsError(f"{name} {rdtype}: DNS servers failed ({exc})", temporary=True) from None
        except dns.exception.Timeout:
            metrics.dns_failure(rdtype, "timeout")
            raise DnsError(f"{name} {rdtype}: DNS timeout", temporary=True) from None
        except dns.exception.DNSException as exc:
            metrics.dns_failure(rdtype, "error")
            raise DnsError(f"{name} {rdtype}: DNS error: {exc}", temporary=True) from None

    async def unreachable(self, lifetime: float | None = None) -> str:
        """Why no DNS server answers at all, or "" when one does (a refusal or
        SERVFAIL is an answer): one question, the root's NS, any resolver knows.
        ``lifetime``: seconds it may take (default: as long as any lookup)."""
        if lifetime is None:
            lifetime = self._resolver.lifetime
        try:
            await self._resolver.resolve(dns.name.root, "NS", search=False, lifetime=lifetime)
        except dns.exception.Timeout:
            return f"no answer within {lifetime:.0f} s"
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors") or []
            if errors and all(answer is None for *_, answer in errors):
                return f"no DNS server answered ({exc})"
        except dns.exception.DNSException:
            pass
        return ""

    async def mx(self, domain: str) -> list[MxRecord]:
        return (await self.mx_dnssec(domain))[0]

    async def mx_dnssec(self, domain: str) -> tuple[list[MxRecord], bool]:
        answer = await self._query(domain, "MX")
        if answer is None:
            return [], False
        secure = _authenticated(answer)
        if answer.rrset is None:
            return [], secure
        return [
            MxRecord(int(r.preference), normalise_host(r.exchange.to_text()))
            for r in answer.rrset
            if r.rdtype == dns.rdatatype.MX
        ], secure

    async def addresses(self, host: str) -> list[str]:
        return (await self.addresses_dnssec(host))[0]

    async def addresses_dnssec(self, host: str) -> tuple[list[str], bool]:
        found: list[str] = []
        secure = True
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self._query(host, rdtype)
            except DnsError as exc:
                if exc.temporary:
                    raise
                return [], False
            if answer is None:
                secure = False
                continue
            secure = secure and _authenticated(answer)
            if answer.rrset is not None:
                found += [r.address for r in answer.rrset if hasattr(r, "address")]
        return found, secure

    async def tlsa(self, host: str, port: int) -> tuple[list[TlsaRecord], bool]:
        try:
            answer = await self._query(f"_{port}._tcp.{host}", "TLSA")
        except DnsError as exc:
            if exc.temporary:
                raise
            return [], False
        if answer is None:
            return [], False
        secure = _authenticated(answer)
        if answer.rrset is None:
            return [], secure
        return [
            TlsaRecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
            for r in answer.rrset
            if r.rdtype == dns.rdatatype.TLSA
        ], secure

    # --- for mail authentication (policy/) and the doctor ---------------------------
    async def txt(self, name: str) -> list[str]:
        answer = await self._query(name, "TXT")
        if answer is None or answer.rrset is None:
            return []
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in answer.rrset
            if r.rdtype == dns.rdatatype.TXT
        ]

    async def ips(self, host: str, rdtype: str) -> list[str]:
        answer = await self._query(host, rdtype)
        if answer is None or answer.rrset is None:
            return []
        return [r.address for r in answer.rrset if hasattr(r, "address")]

    async def ptr(self, ip: str) -> list[str]:
        name = dns.reversename.from_address(ip).to_text()
        try:
            answer = await self._query(name.rstrip("."), "PTR")
        except DnsError as exc:
            if exc.temporary:
                raise
            return []
        if answer is None or answer.rrset is None:
            return []
        return [
            normalise_host(r.target.to_text())
            for r in answer.rrset
            if r.rdtype == dns.rdatatype.PTR
        ]

    async def srv(self, name: str) -> list[SrvRecord]:
        try:
            answer = await self._query(name, "SRV")
        except DnsError as exc:
            if exc.temporary:
                raise
            return []
        if answer is None or answer.rrset is None:
            return []
        return [
            SrvRecord(
                int(r.priority), int(r.weight), int(r.port), normalise_host(r.target.to_text())
            )
            for r in answer.rrset
            if r.rdtype == dns.rdatatype.SRV
        ]
