"""DMARC (RFC 7489): policy discovery, identifier alignment, the verdict.

Hand-written: the DMARC packages on PyPI either look records up with their
own resolver (we must use ours: SPEC, every lookup through
``[relay] dns_servers``), or are report parsers and record linters.  What
evaluation needs is small: find the record (§6.6.3), parse its tags (§6.3),
compare domains (§3.1) using the Organizational Domain from the Public
Suffix List (``publicsuffixlist``, which ships the list), and apply ``pct``
(§6.6.4).  The record's ``rua=`` mailto: URIs are kept for aggregate
reports (§7.2): mailauth.py records each evaluated message in
dmarc_store.py and delivery/dmarc_reports.py mails the daily reports;
failure reports (ruf=, §7.3) are not sent.
"""

from __future__ import annotations

import email.utils
import enum
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from postoffice.dns.resolver import DnsError, Resolver
from postoffice.mail.address import AddressError, normalise_domain
from postoffice.mail.headers import field_values

POLICIES = ("none", "quarantine", "reject")


class DmarcResult(enum.StrEnum):
    NONE = "none"  # no policy published
    PASS = "pass"
    FAIL = "fail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    domain: str  # where the record was found (the From domain or its organizational domain)
    policy: str  # p=
    subdomain_policy: str  # sp= (default: p)
    adkim: str = "r"  # "r" relaxed or "s" strict alignment (§3.1.1)
    aspf: str = "r"
    pct: int = 100
    # rua= mailto: URIs as published, size suffix included ("mailto:d@x.test!10m");
    # other schemes are dropped (§6.2: we send reports only by mail).
    rua: tuple[str, ...] = ()
    fo: str = "0"  # failure reporting options, reported back in policy_published (§7.2.1.1)


@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    result: DmarcResult
    from_domain: str
    policy: str = "none"  # the policy that applies to this message after pct
    published: str = "none"  # the policy the domain asks for
    reason: str = ""
    # For aggregate reports (§7.2, Appendix C policy_evaluated): the record it
    # was judged by, each identifier's aligned pass, and pct= sampling.
    record: DmarcRecord | None = None
    dkim_aligned: bool = False
    spf_aligned: bool = False
    sampled_out: bool = False


MAX_AUTHOR_DOMAINS = 5  # distinct From: domains evaluated; more: refused (§6.6.1)
MAX_FROM_LENGTH = 4096  # characters of the From: field; longer: refused


@dataclass(frozen=True, slots=True)
class Authors:
    """The Author Domains of a message (RFC 7489 §6.6.1), or why DMARC cannot
    evaluate its author (``problem``): then the message is refused where
    DMARC is enforced, since a sender could otherwise pick a From: that
    escapes the check and still shows a protected domain to the reader."""

    domains: tuple[str, ...] = ()
    problem: str = ""


def _author_domain(address: str) -> str | None:
    """The domain of one From: address, normalised (A-labels, lower case, no
    trailing dot: ``paypal.test.`` is ``paypal.test``); None if it has none
    DMARC can evaluate (no domain, an address literal, not a domain name)."""
    _local, at, domain = address.rpartition("@")
    domain = domain.strip()
    if not at or not domain or domain.startswith("["):
        return None
    if domain.endswith("."):
        domain = domain[:-1]  # the root: one name (RFC 1034 §3.1)
    try:
        return normalise_domain(domain)
    except AddressError:
        return None


_AT_DOMAIN = re.compile(r"@([^\s<>,;:@()\"\[\]\\]+)")


def _outside_quotes_and_comments(value: str) -> str:
    """``value`` with quoted strings and (nested) comments blanked out, in
    one pass: what is left is where addresses are."""
    out = []
    depth, quoted, escaped = 0, False, False
    for c in value:
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif c == '"' and not depth:
            quoted = True
        elif not depth:
            out.append(c)
            continue
        out.append(" ")
    return "".join(out)


def _addresses(value: str) -> list[str] | None:
    """The addresses of a From: value, read twice: by ``email.utils`` and by
    a lenient scan for every ``@domain`` outside quoted strings and comments
    (what a lenient mail reader might show).  The union: a domain one reading
    misses (a parser differential) is evaluated too.  None: no reading.
    (``email.headerregistry`` would be a third, but it is quadratic: 0.8 s
    of the event loop for 4,000 quotes.)"""
    try:
        found = [addr for _name, addr in email.utils.getaddresses([value])]
    except RecursionError:  # nested comments
        return None
    bare = _AT_DOMAIN.findall(_outside_quotes_and_comments(value))
    return found + [f"@{domain}" for domain in bare]


def authors(block: bytes) -> Authors:
    """§6.6.1: exactly one From: field whose every address has a domain DMARC
    can evaluate, at most MAX_AUTHOR_DOMAINS of them; every one of them is
    evaluated and the strictest failing policy applies (mailauth.py).
    ``block``: the message's header section (mail/headers.py header_block)."""
    values = field_values(block, "from")
    if not values:
        return Authors(problem="no From: field")
    if len(values) > 1:
        return Authors(problem=f"{len(values)} From: fields (RFC 5322 section 3.6 allows one)")
    value = values[0].decode("utf-8", "replace")
    if len(value) > MAX_FROM_LENGTH:
        return Authors(problem="From: field too long")
    addresses = _addresses(value)
    if addresses is None:
        return Authors(problem="From: field does not parse")
    domains: dict[str, None] = {}
    for address in addresses:
        domain = _author_domain(address)
        if domain is None:
            return Authors(problem="From: address without a usable domain")
        domains[domain] = None
    if not domains:
        return Authors(problem="no From: address")
    if len(domains) > MAX_AUTHOR_DOMAINS:
        return Authors(problem=f"more than {MAX_AUTHOR_DOMAINS} From: domains")
    return Authors(tuple(domains))


@lru_cache(maxsize=1)
def _psl() -> object:
    from publicsuffixlist import PublicSuffixList  # parses the list: once per process

    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registered domain (§3.2): one label below the public suffix.  A
    name that is itself a public suffix is its own organizational domain."""
    name = domain.rstrip(".").lower()
    found = _psl().privatesuffix(name)  # type: ignore[attr-defined]
    return str(found) if found else name


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (§3.1): the same name (strict), or the same
    organizational domain (relaxed)."""
    a, b = identifier.rstrip(".").lower(), from_domain.rstrip(".").lower()
    if a == b:
        return True
    return mode != "s" and organizational_domain(a) == organizational_domain(b)


def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def is_dmarc_record(text: str) -> bool:
    """§6.6.3 step 3: records not starting with v=DMARC1 are discarded."""
    name, sep, value = text.split(";", 1)[0].partition("=")
    return bool(sep) and name.strip() == "v" and value.strip() == "DMARC1"


def parse_record(text: str, domain: str) -> DmarcRecord | None:
    """The record's policy; None when it cannot be used (§6.6.3 step 6: no
    valid p= and no usable rua= means no DMARC processing)."""
    tags = _tags(text)
    policy = tags.get("p", "").lower()
    sub = tags.get("sp", "").lower()
    if policy not in POLICIES or (sub and sub not in POLICIES):
        if "mailto:" not in tags.get("rua", "").lower():
            return None
        policy, sub = "none", "none"  # §6.6.3 step 6: act as if p=none
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    rua = tuple(
        uri.strip()
        for uri in tags.get("rua", "").split(",")
        if uri.strip().lower().startswith("mailto:")
    )
    return DmarcRecord(
        domain=domain,
        policy=policy,
        subdomain_policy=sub or policy,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=min(max(pct, 0), 100),
        rua=rua,
        fo=tags.get("fo", "0")[:20],
    )


class DmarcTempError(Exception):
    pass


async def _records_at(resolver: Resolver, domain: str) -> list[str]:
    try:
        found = await resolver.txt(f"_dmarc.{domain}")
    except DnsError as exc:
        if exc.temporary:
            raise DmarcTempError(str(exc)) from None
        return []
    return [t for t in found if is_dmarc_record(t)]


async def discover(resolver: Resolver, from_domain: str) -> DmarcRecord | None:
    """Policy discovery (§6.6.3): _dmarc.<From domain>, else _dmarc.<its
    organizational domain>.  Several records at one name: no policy.
    Raise DmarcTempError when DNS failed (the verdict is unknown, not none)."""
    for domain in dict.fromkeys([from_domain, organizational_domain(from_domain)]):
        records = await _records_at(resolver, domain)
        if len(records) == 1:
            return parse_record(records[0], domain)
        if records:
            return None
    return None


def _downgrade(policy: str) -> str:
    # §6.6.4: a message not sampled by pct gets the next less strict policy.
    return {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")


def evaluate(
    record: DmarcRecord,
    from_domain: str,
    *,
    spf_pass_domain: str | None,
    dkim_pass_domains: Sequence[str],
    rng: random.Random | None = None,
) -> DmarcVerdict:
    """The DMARC result for a message whose From: domain is ``from_domain``.
    ``spf_pass_domain``: the MAIL FROM (or HELO) domain if SPF passed;
    ``dkim_pass_domains``: the d= of every signature that verified."""
    published = record.policy if record.domain == from_domain else record.subdomain_policy
    # Both identifiers are judged (a report shows each, Appendix C).
    spf_aligned = spf_pass_domain is not None and aligned(spf_pass_domain, from_domain, record.aspf)
    dkim_domain = next(
        (d for d in dkim_pass_domains if aligned(d, from_domain, record.adkim)), None
    )
    if spf_aligned or dkim_domain is not None:
        reason = f"SPF aligned ({spf_pass_domain})" if spf_aligned else f"DKIM d={dkim_domain}"
        return DmarcVerdict(
            DmarcResult.PASS,
            from_domain,
            "none",
            published,
            reason,
            record=record,
            dkim_aligned=dkim_domain is not None,
            spf_aligned=spf_aligned,
        )
    policy = published
    sampled_out = False
    if record.pct < 100 and (rng or random.SystemRandom()).random() * 100 >= record.pct:
        policy, sampled_out = _downgrade(policy), True
    return DmarcVerdict(
        DmarcResult.FAIL,
        from_domain,
        policy,
        published,
        "no aligned SPF or DKIM pass",
        record=record,
        sampled_out=sampled_out,
    )
