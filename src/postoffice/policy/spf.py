"""SPF (RFC 7208): may this client send mail for this domain?

``check_host`` is the function of RFC 7208 §4: the client's address, the
domain to check and the sender, in; one of the seven results (§2.6) out.
Every DNS question goes through the resolver handed in (SPEC: all lookups
use ``[relay] dns_servers`` when set).

Written here rather than taken from pyspf: pyspf (last release 2020) looks
names up through a module-global, synchronous function built on dnspython's
deprecated ``dns.resolver.query`` (a warning, an error under our test
settings); it cannot use our resolver without copying its ``dns()`` method,
and every check would hold a worker thread through each DNS round trip.
This evaluator is async and small: mechanisms, modifiers, macros (§7), the
limits of §4.6.4.  Not done: the ``exp=`` explanation (only for rejections
we do not word from it) and the ``%{p}`` macro, which expands to "unknown"
as §7.3 allows.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from postoffice.dns.mx import MxRecord
from postoffice.dns.resolver import DnsError, Resolver
from postoffice.policy.clients import client_address

MAX_DNS_TERMS = 10  # include, a, mx, ptr, exists, redirect (§4.6.4)
MAX_VOID_LOOKUPS = 2  # lookups answered with no records or NXDOMAIN (§4.6.4)
MAX_MX_NAMES = 10  # address lookups per "mx" mechanism (§4.6.4)
MAX_PTR_NAMES = 10  # names per "ptr" mechanism (§4.6.4)
MAX_DEPTH = MAX_DNS_TERMS + 1  # include/redirect nesting (each costs a term anyway)
MAX_DOMAIN = 253


class SpfResult(enum.StrEnum):
    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    result: SpfResult
    domain: str  # the identity's domain that was checked
    reason: str  # the matching mechanism, or what went wrong (for comments and logs)


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


_QUALIFIERS = {
    "+": SpfResult.PASS,
    "-": SpfResult.FAIL,
    "~": SpfResult.SOFTFAIL,
    "?": SpfResult.NEUTRAL,
}
_MECHANISM = re.compile(r"([-+~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(.*)", re.IGNORECASE)
_MODIFIER = re.compile(r"([a-z][a-z0-9_.\-]*)=(.*)", re.IGNORECASE)
_DUAL_CIDR = re.compile(r"(?::([^/]*))?(?:/(\d+))?(?://(\d+))?")
_MACRO = re.compile(r"%\{([a-z])(\d*)(r?)([.\-+,/_=]*)\}", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?", re.IGNORECASE)
_TOPLABEL = re.compile(r"[a-z0-9\-]*[a-z][a-z0-9\-]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _Mechanism:
    result: SpfResult
    name: str
    domain_spec: str  # "" where the current domain applies
    ip4_len: int
    ip6_len: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    text: str


@dataclass(frozen=True, slots=True)
class _Record:
    mechanisms: tuple[_Mechanism, ...]
    redirect: str | None


def _valid_domain(name: str) -> bool:
    """A domain name usable as an SPF target (§4.3: FQDN, labels of 1-63)."""
    if not name or len(name) > MAX_DOMAIN or "." not in name.strip("."):
        return False
    labels = name.rstrip(".").split(".")
    return all(_LABEL.fullmatch(label) for label in labels)


def _cidr(text: str | None, maximum: int) -> int:
    if text is None:
        return maximum
    value = int(text)
    if value > maximum or (len(text) > 1 and text.startswith("0")):
        raise _PermError(f"bad CIDR length /{text}")
    return value


def _parse_mechanism(term: str) -> _Mechanism:
    m = _MECHANISM.fullmatch(term)
    if m is None:
        raise _PermError(f"unknown mechanism {term!r}")
    qualifier, name, tail = m.group(1), m.group(2).lower(), m.group(3)
    result = _QUALIFIERS[qualifier or "+"]
    domain_spec, ip4_len, ip6_len = "", 32, 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    if name == "all":
        if tail:
            raise _PermError(f"bad mechanism {term!r}")
    elif name in ("include", "exists"):
        if not tail.startswith(":") or len(tail) < 2:
            raise _PermError(f"{name} needs a domain: {term!r}")
        domain_spec = tail[1:]
    elif name in ("a", "mx"):
        c = _DUAL_CIDR.fullmatch(tail)
        if c is None or c.group(1) == "":
            raise _PermError(f"bad mechanism {term!r}")
        domain_spec = c.group(1) or ""
        ip4_len, ip6_len = _cidr(c.group(2), 32), _cidr(c.group(3), 128)
    elif name == "ptr":
        if tail and (not tail.startswith(":") or len(tail) < 2):
            raise _PermError(f"bad mechanism {term!r}")
        domain_spec = tail[1:]
    else:  # ip4, ip6: literal networks, no macros (§5.6)
        if not tail.startswith(":"):
            raise _PermError(f"{name} needs an address: {term!r}")
        address, _, length = tail[1:].partition("/")
        try:
            ip = ipaddress.ip_address(address)
            bits = 32 if name == "ip4" else 128
            if ip.version != (4 if name == "ip4" else 6):
                raise ValueError(address)
            prefix = _cidr(length, bits) if length else bits
            network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        except ValueError:
            raise _PermError(f"bad address in {term!r}") from None
    if domain_spec:
        _check_macro_string(domain_spec)
    return _Mechanism(result, name, domain_spec, ip4_len, ip6_len, network, term)


def _check_macro_string(text: str) -> None:
    """Syntax only (§7.1): every % starts a known expansion."""
    rest = _MACRO.sub("", text).replace("%%", "").replace("%_", "").replace("%-", "")
    if "%" in rest:
        raise _PermError(f"bad macro in {text!r}")
    for m in _MACRO.finditer(text):
        if m.group(1).lower() not in "slodiphv":  # c, r, t: only in exp= (§7.2)
            raise _PermError(f"macro %{{{m.group(1)}}} not allowed here")
        if m.group(2) and int(m.group(2)) == 0:
            raise _PermError(f"bad macro in {text!r}")


def parse_record(text: str) -> _Record:
    """Parse a whole "v=spf1 ..." record; any syntax error is a permerror (§4.6)."""
    terms = [t for t in text.split(" ")[1:] if t]
    mechanisms: list[_Mechanism] = []
    redirect: str | None = None
    seen: set[str] = set()
    for term in terms:
        mod = _MODIFIER.fullmatch(term)
        if mod is not None:  # name=value: a modifier (a mechanism never has = there)
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                if name in seen:  # §6: each at most once
                    raise _PermError(f"{name}= given twice")
                seen.add(name)
                if not value:
                    raise _PermError(f"{name}= needs a domain")
                _check_macro_string(value)
                if name == "redirect":
                    redirect = value
            continue  # unknown modifiers are ignored (§6)
        mechanisms.append(_parse_mechanism(term))
    return _Record(tuple(mechanisms), redirect)


def is_spf_record(text: str) -> bool:
    low = text.lower()
    return low == "v=spf1" or low.startswith("v=spf1 ")


class _Evaluation:
    def __init__(self, resolver: Resolver, ip: str, sender: tuple[str, str], helo: str) -> None:
        self.resolver = resolver
        address = client_address(ip)
        if address is None:
            raise ValueError(f"not an IP address: {ip!r}")
        self.ip = address  # an IPv4 client on a dual-stack socket is IPv4 (§5)
        self.local, self.sender_domain = sender
        self.helo = helo
        self.terms = 0
        self.voids = 0

    # --- DNS with the §4.6.4 limits ---------------------------------------------------
    def _count_term(self) -> None:
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms")

    async def _ask(
        self, fn: Callable[..., Awaitable[Sequence[object]]], *args: str, void: bool = True
    ) -> Sequence[object]:
        try:
            found = await fn(*args)
        except DnsError as exc:
            if exc.temporary:
                raise _TempError(str(exc)) from None
            found = []
        if not found and void:
            self.voids += 1
            if self.voids > MAX_VOID_LOOKUPS:
                raise _PermError(f"more than {MAX_VOID_LOOKUPS} void DNS lookups")
        return found

    async def _addresses(self, name: str, *, void: bool = True) -> list[str]:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        return [str(a) for a in await self._ask(self.resolver.ips, name, rdtype, void=void)]

    # --- macros (§7) ---------------------------------------------------------------------
    def _macro_value(self, letter: str, domain: str) -> str:
        match letter:
            case "s":
                return f"{self.local}@{self.sender_domain}"
            case "l":
                return self.local
            case "o":
                return self.sender_domain
            case "d":
                return domain
            case "i":
                if self.ip.version == 4:
                    return str(self.ip)
                return ".".join(self.ip.exploded.replace(":", ""))
            case "v":
                return "in-addr" if self.ip.version == 4 else "ip6"
            case "h":
                return self.helo
        return "unknown"  # p: the validated name is optional to compute (§7.3)

    def expand(self, spec: str, domain: str) -> str:
        def one(m: re.Match[str]) -> str:
            letter = m.group(1)
            value = self._macro_value(letter.lower(), domain)
            parts = re.split("[" + re.escape(m.group(4) or ".") + "]", value)
            if m.group(3):
                parts.reverse()
            if m.group(2):
                parts = parts[-int(m.group(2)) :]
            out = ".".join(parts)
            return urllib.parse.quote(out, safe="") if letter.isupper() else out

        text = _MACRO.sub(one, spec)
        text = text.replace("%%", "%").replace("%_", " ").replace("%-", "%20")
        text = text.rstrip(".")
        while len(text) > MAX_DOMAIN and "." in text:  # §7.3: drop labels from the left
            text = text.split(".", 1)[1]
        if not _valid_domain(text) or not _TOPLABEL.fullmatch(text.rsplit(".", 1)[-1]):
            raise _PermError(f"{spec!r} does not expand to a domain name ({text!r})")
        return text.lower()

    # --- check_host (§4) --------------------------------------------------------------
    async def check(self, domain: str, depth: int) -> tuple[SpfResult, str]:
        if depth > MAX_DEPTH:
            raise _PermError("include/redirect nested too deeply")
        if not _valid_domain(domain):
            return SpfResult.NONE, f"{domain!r} is not a domain name"
        try:
            txt = await self.resolver.txt(domain)
        except DnsError as exc:
            if exc.temporary:
                raise _TempError(str(exc)) from None
            return SpfResult.NONE, f"no such domain {domain}"
        records = [t for t in txt if is_spf_record(t)]
        if not records:
            return SpfResult.NONE, f"no SPF record for {domain}"
        if len(records) > 1:  # §4.5
            raise _PermError(f"{domain} has {len(records)} SPF records")
        record = parse_record(records[0])
        for mech in record.mechanisms:
            if await self._matches(mech, domain, depth):
                return mech.result, f"{domain}: {mech.text}"
        if record.redirect is not None:
            self._count_term()
            target = self.expand(record.redirect, domain)
            result, reason = await self.check(target, depth + 1)
            if result is SpfResult.NONE:  # §6.1
                raise _PermError(f"redirect={target}: {reason}")
            return result, reason
        return SpfResult.NEUTRAL, f"{domain}: no mechanism matched"  # §4.7

    def _in(self, addresses: list[str], mech: _Mechanism) -> bool:
        length = mech.ip4_len if self.ip.version == 4 else mech.ip6_len
        for text in addresses:
            try:
                net = ipaddress.ip_network(f"{text}/{length}", strict=False)
            except ValueError:
                continue
            if net.version == self.ip.version and self.ip in net:
                return True
        return False

    async def _matches(self, mech: _Mechanism, domain: str, depth: int) -> bool:
        name = mech.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            net = mech.network
            return net is not None and net.version == self.ip.version and self.ip in net
        self._count_term()
        target = self.expand(mech.domain_spec, domain) if mech.domain_spec else domain
        if name == "include":
            result, reason = await self.check(target, depth + 1)
            if result is SpfResult.PASS:
                return True
            if result is SpfResult.NONE:  # §5.2: include of nothing is an error
                raise _PermError(f"include:{target}: {reason}")
            return False  # fail, softfail, neutral: no match
        if name == "a":
            return self._in(await self._addresses(target), mech)
        if name == "mx":
            records = await self._ask(self.resolver.mx, target)
            hosts = [r.host for r in records if isinstance(r, MxRecord) and r.host]
            if len(hosts) > MAX_MX_NAMES:
                raise _PermError(f"{target} has more than {MAX_MX_NAMES} MX records")
            for host in hosts:
                if self._in(await self._addresses(host, void=False), mech):
                    return True
            return False
        if name == "exists":  # always an A query, whatever the client's family (§5.7)
            return bool(await self._ask(self.resolver.ips, target, "A"))
        return await self._ptr_matches(target)

    async def _ptr_matches(self, target: str) -> bool:
        """§5.5 (deprecated but still seen): a validated reverse name in ``target``."""
        try:
            names = await self._ask(self.resolver.ptr, str(self.ip))
        except _TempError:
            return False  # §5.5: a PTR lookup error means no match
        for name in [str(n) for n in names][:MAX_PTR_NAMES]:
            if not (name == target or name.endswith("." + target)):
                continue
            try:
                if str(self.ip) in await self._addresses(name, void=False):
                    return True
            except _TempError:
                continue  # §5.5: that name is skipped
        return False


async def check_host(
    resolver: Resolver,
    ip: str,
    domain: str,
    sender: tuple[str, str],
    helo: str,
) -> SpfVerdict:
    """The SPF result for ``ip`` sending as ``sender`` (local part, domain)
    with ``domain`` as the domain to check (§4.1); never raises for DNS or
    record trouble, which are temperror and permerror."""
    evaluation = _Evaluation(resolver, ip, sender, helo)
    try:
        result, reason = await evaluation.check(domain.rstrip(".").lower(), 0)
    except _TempError as exc:
        return SpfVerdict(SpfResult.TEMPERROR, domain, str(exc))
    except _PermError as exc:
        return SpfVerdict(SpfResult.PERMERROR, domain, str(exc))
    return SpfVerdict(result, domain, reason)
