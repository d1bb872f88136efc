"""Inbound mail authentication on the ``smtp`` listener: SPF, DKIM, DMARC.

The SMTP session asks ``InboundChecks.applies(client_ip)`` when DATA starts
(clients in ``[checks] exempt_networks`` are neither looked up nor judged)
and, at the end of DATA, ``judge(...)`` with the whole message.  The answer
is one ``Authentication-Results`` field (RFC 8601) stamped with our host
name, and possibly a refusal:

* SPF (RFC 7208) of the MAIL FROM identity (the HELO identity for a null
  sender, §2.4) and of the HELO name (§2.3);
* every DKIM signature (RFC 6376; RSA and Ed25519, RFC 8463), at most
  ``MAX_SIGNATURES`` of them (§6.1 lets verifiers limit the work);
* DMARC (RFC 7489) for each From: domain, from those two.

Policy: a DMARC failure whose domain publishes ``p=reject`` is refused with
550 5.7.1 when ``[checks] dmarc_reject`` is on (§6.6.4 — pct= applied);
everything else is only recorded.  A DNS failure never passes silently:
when DMARC did not pass and a lookup that could change that failed for the
moment, the answer is 451 4.7.0 and the sender retries (RFC 7208 §2.6.6,
RFC 6376 §6.1.2, RFC 7489 §6.6.3).

Every name is looked up through the server's resolver (``[relay]
dns_servers``).  DKIM keys are fetched on the event loop first; dkimpy then
verifies in a worker thread (hashing a large body is CPU work) with those
answers, so it never does DNS of its own and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import dkim
import dkim.util

from postoffice import logfmt
from postoffice.config.settings import Settings
from postoffice.delivery.mx import MxRecord
from postoffice.delivery.resolver import DnsError
from postoffice.mail.address import Address
from postoffice.policy import dmarc, spf
from postoffice.protocol.smtp_reply import Reply

log = logging.getLogger("postoffice.mailauth")

CHECK_TIMEOUT = 30.0  # seconds for all lookups of one message (RFC 7208 §4.6.4: >= 20)
MAX_SIGNATURES = 5  # DKIM signatures verified per message
MAX_AUTHOR_DOMAINS = 3  # From: domains given a DMARC verdict
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT consider shorter keys valid

# dkimpy logs key problems at ERROR level; we report them in the header instead.
_DKIMPY_LOG = logging.Logger("postoffice.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())
_DKIMPY_LOG.propagate = False


class AuthResolver(Protocol):
    async def txt(self, name: str) -> list[str]: ...
    async def mx(self, domain: str) -> list[MxRecord]: ...
    async def ips(self, host: str, rdtype: str) -> list[str]: ...
    async def ptr(self, ip: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    result: str  # pass, fail, neutral, permerror, temperror (RFC 8601 §2.7.1)
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""  # the first characters of b=, telling signatures apart (RFC 6008)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    header: bytes  # the Authentication-Results field, LF line ends
    reply: Reply | None = None  # a refusal (5xx) or a temporary failure (4xx)
    mail_spf: spf.SpfVerdict | None = None
    helo_spf: spf.SpfVerdict | None = None
    dkim_results: tuple[DkimVerdict, ...] = ()
    dmarc_results: tuple[dmarc.DmarcVerdict, ...] = field(default_factory=tuple)


# --- DKIM ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Signature:
    index: int
    domain: str
    selector: str
    algorithm: str
    b: str
    problem: str = ""  # unusable before any lookup (syntax)


_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?")


def _is_name(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return 0 < len(text) < 254 and all(_NAME.fullmatch(label) for label in labels)


def _signatures_blocking(message: bytes) -> list[_Signature]:
    """The DKIM-Signature fields of ``message`` (at most MAX_SIGNATURES)."""
    try:
        d = dkim.DKIM(message, logger=_DKIMPY_LOG)
    except dkim.DKIMException:
        return []  # a header block dkimpy cannot parse: nothing it could verify
    found = []
    fields = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    for index, value in enumerate(fields[:MAX_SIGNATURES]):
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList as exc:
            found.append(_Signature(index, "", "", "", "", f"bad tag list: {exc}"))
            continue
        domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
        selector = tags.get(b"s", b"").decode("ascii", "replace").lower()
        algorithm = tags.get(b"a", b"").decode("ascii", "replace").lower()
        b = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]
        problem = ""
        if not (_is_name(domain) and _is_name(selector)):
            problem = "bad d= or s="
        found.append(_Signature(index, domain, selector, algorithm, b, problem))
    return found


_TEMP = object()  # a key lookup that failed for the moment


def _key_name(sig: _Signature) -> str:
    return f"{sig.selector}._domainkey.{sig.domain}"


def _key_record(records: list[str]) -> str | None:
    """RFC 6376 §3.6.2.2: of several TXT records, the one that is a key."""
    for text in records:
        if "p=" in text:
            return text
    return records[0] if records else None


def _verify_blocking(
    message: bytes, signatures: list[_Signature], keys: dict[str, object]
) -> list[DkimVerdict]:
    d = dkim.DKIM(message, logger=_DKIMPY_LOG, minkey=MIN_RSA_BITS)
    verdicts = []
    for sig in signatures:

        def verdict(result: str, reason: str = "", sig: _Signature = sig) -> DkimVerdict:
            return DkimVerdict(result, sig.domain, sig.selector, sig.algorithm, sig.b, reason)

        if sig.problem:
            verdicts.append(verdict("permerror", sig.problem))
            continue
        name = _key_name(sig)
        record = keys.get(name)
        if record is _TEMP:
            verdicts.append(verdict("temperror", "key lookup failed"))
            continue
        if not isinstance(record, str):
            verdicts.append(verdict("permerror", "no key for signature"))
            continue
        try:
            dkim.evaluate_pk(name, record)
        except dkim.DKIMException as exc:
            verdicts.append(verdict("permerror", f"bad key record: {exc}"))
            continue

        def dnsfunc(_name: bytes, timeout: float = 5, record: str = record) -> bytes:
            return record.encode("ascii", "replace")

        try:
            ok = d.verify(sig.index, dnsfunc=dnsfunc)
        except dkim.ValidationError as exc:
            text = str(exc)
            reason = "body hash did not verify" if "body hash" in text else text
            verdicts.append(verdict("fail", reason))
            continue
        except dkim.KeyFormatError as exc:
            verdicts.append(verdict("permerror", str(exc)))
            continue
        except dkim.DKIMException as exc:
            verdicts.append(verdict("neutral", f"signature not usable: {exc}"))
            continue
        verdicts.append(verdict("pass") if ok else verdict("fail", "signature did not verify"))
    return verdicts


# --- the header -------------------------------------------------------------------------------
_UNSAFE_COMMENT = re.compile(r"[^\x20-\x27\x2a-\x5b\x5d-\x7e]")  # no ( ) \ or controls
_LOCAL_OK = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _comment(text: str) -> str:
    text = _UNSAFE_COMMENT.sub("?", text).strip()
    return f" ({text[:120]})" if text else ""


def _pvalue(text: str) -> str:
    """A property value that needs no quoting (RFC 8601 §2.2)."""
    return re.sub(r"[^A-Za-z0-9.\-_@+=/!#$%&'*^`{|}~]", "?", text)[:255]


def _mailfrom(sender: Address) -> str:
    if _LOCAL_OK.fullmatch(sender.local) and sender.local.isascii():
        return _pvalue(f"{sender.local}@{sender.domain}")
    return _pvalue(sender.domain)


def format_header(hostname: str, results: Sequence[str]) -> bytes:
    """``Authentication-Results: hostname;`` and one result per folded line."""
    lines = [f"Authentication-Results: {hostname};"]
    items = list(results) or ["none"]  # RFC 8601 §2.2: no-result
    for i, item in enumerate(items):
        lines.append("\t" + item + (";" if i < len(items) - 1 else ""))
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


# --- the checks -----------------------------------------------------------------------------------
def _helo_domain(helo: str) -> str | None:
    name = helo.strip().rstrip(".").lower()
    if not name or name.startswith("[") or "." not in name or not _is_name(name):
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


async def _nothing() -> None:
    return None


class InboundChecks:
    def __init__(
        self,
        settings: Settings,
        resolver: AuthResolver,
        executor: Executor,
        *,
        timeout: float = CHECK_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self._hostname = settings.hostname
        self._exempt = settings.checks.exempt_networks
        self._dmarc_reject = settings.checks.dmarc_reject
        self._resolver = resolver
        self._executor = executor
        self._timeout = timeout
        self._rng = rng or random.SystemRandom()

    def applies(self, client_ip: str) -> bool:
        """False for clients in ``[checks] exempt_networks`` (and non-IP peers)."""
        try:
            ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return not any(ip.version == net.version and ip in net for net in self._exempt)

    async def judge(
        self, *, client_ip: str, helo: str, sender: Address | None, message: bytes
    ) -> CheckOutcome:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._judge(client_ip, helo, sender, message)
        except TimeoutError:
            log.warning("mailauth client=%s: checks timed out", client_ip)
            return CheckOutcome(
                header=format_header(self._hostname, []),
                reply=Reply(
                    451, "Sender authentication checks timed out, try again later", "4.7.0"
                ),
            )
        except Exception:  # a bug here must neither pass the message unchecked nor end the session
            log.exception("mailauth client=%s: checks failed", client_ip)
            return CheckOutcome(
                header=format_header(self._hostname, []),
                reply=Reply(451, "Local error in sender authentication checks", "4.7.0"),
            )

    async def _spf(self, client_ip: str, identity: tuple[str, str], helo: str) -> spf.SpfVerdict:
        if identity[1].startswith("["):  # an address literal names no SPF domain
            return spf.SpfVerdict(spf.SpfResult.NONE, identity[1], "address literal")
        return await spf.check_host(self._resolver, client_ip, identity[1], identity, helo)

    async def _dkim(self, message: bytes) -> list[DkimVerdict]:
        loop = asyncio.get_running_loop()
        signatures = await loop.run_in_executor(self._executor, _signatures_blocking, message)
        if not signatures:
            return []
        names = list(dict.fromkeys(_key_name(s) for s in signatures if not s.problem))
        answers = await asyncio.gather(*(self._key(n) for n in names))
        keys = dict(zip(names, answers, strict=True))
        return await loop.run_in_executor(
            self._executor, _verify_blocking, message, signatures, keys
        )

    async def _key(self, name: str) -> object:
        try:
            return _key_record(await self._resolver.txt(name))
        except DnsError as exc:
            return _TEMP if exc.temporary else None

    async def _dmarc(
        self, from_domain: str, spf_verdict: spf.SpfVerdict | None, dkims: list[DkimVerdict]
    ) -> dmarc.DmarcVerdict:
        try:
            record = await dmarc.discover(self._resolver, from_domain)
        except dmarc.DmarcTempError as exc:
            return dmarc.DmarcVerdict(dmarc.DmarcResult.TEMPERROR, from_domain, reason=str(exc))
        if record is None:
            return dmarc.DmarcVerdict(dmarc.DmarcResult.NONE, from_domain, reason="no policy")
        spf_domain = (
            spf_verdict.domain
            if spf_verdict is not None and spf_verdict.result is spf.SpfResult.PASS
            else None
        )
        return dmarc.evaluate(
            record,
            from_domain,
            spf_pass_domain=spf_domain,
            dkim_pass_domains=[v.domain for v in dkims if v.result == "pass"],
            rng=self._rng,
        )

    async def _judge(
        self, client_ip: str, helo: str, sender: Address | None, message: bytes
    ) -> CheckOutcome:
        helo_domain = _helo_domain(helo)
        helo_identity = ("postmaster", helo_domain) if helo_domain else None
        mail_identity = (sender.local, sender.domain) if sender is not None else helo_identity
        mail_spf, helo_spf, dkims = await asyncio.gather(
            self._spf(client_ip, mail_identity, helo)
            if sender is not None and mail_identity is not None
            else _nothing(),
            self._spf(client_ip, helo_identity, helo) if helo_identity is not None else _nothing(),
            self._dkim(message),
        )
        # DMARC's SPF identity: MAIL FROM, or HELO for a null sender (RFC 7489 §3.1.2).
        dmarc_spf = mail_spf if sender is not None else helo_spf
        authors = dmarc.author_domains(message)[:MAX_AUTHOR_DOMAINS]
        dmarcs = list(await asyncio.gather(*(self._dmarc(a, dmarc_spf, dkims) for a in authors)))
        outcome_reply = self._decide(dmarc_spf, dkims, dmarcs)
        results = self._results(sender, helo_domain, mail_spf, helo_spf, dkims, dmarcs, authors)
        log.info(
            "mailauth client=%s helo=%s from=%s spf=%s dkim=%s dmarc=%s result=%s",
            client_ip,
            logfmt.field(helo or "-"),
            logfmt.path(sender),
            dmarc_spf.result if dmarc_spf else "none",
            # d= and From: domains are the sender's choice: quoted when odd.
            logfmt.field(",".join(f"{v.result}:{v.domain}" for v in dkims) or "none"),
            logfmt.field(",".join(f"{v.result}:{v.from_domain}" for v in dmarcs) or "none"),
            outcome_reply.code if outcome_reply else "accept",
        )
        return CheckOutcome(
            header=format_header(self._hostname, results),
            reply=outcome_reply,
            mail_spf=mail_spf,
            helo_spf=helo_spf,
            dkim_results=tuple(dkims),
            dmarc_results=tuple(dmarcs),
        )

    def _decide(
        self,
        dmarc_spf: spf.SpfVerdict | None,
        dkims: list[DkimVerdict],
        dmarcs: list[dmarc.DmarcVerdict],
    ) -> Reply | None:
        if dmarcs and all(v.result is dmarc.DmarcResult.PASS for v in dmarcs):
            return None  # nothing that failed for the moment could change this
        temporary = [
            *(["SPF"] if dmarc_spf and dmarc_spf.result is spf.SpfResult.TEMPERROR else []),
            *(["DKIM key"] if any(v.result == "temperror" for v in dkims) else []),
            *(["DMARC"] if any(v.result is dmarc.DmarcResult.TEMPERROR for v in dmarcs) else []),
        ]
        if temporary:
            return Reply(
                451,
                f"Temporary DNS failure in {', '.join(temporary)} checks, try again later",
                "4.7.0",
            )
        for v in dmarcs:
            if v.result is dmarc.DmarcResult.FAIL and v.policy == "reject" and self._dmarc_reject:
                # RFC 7489 §6.6.4 / §10.3: a refusal that names the policy.
                return Reply(
                    550, f"Email from {v.from_domain} rejected per its DMARC policy", "5.7.1"
                )
        return None

    def _results(
        self,
        sender: Address | None,
        helo_domain: str | None,
        mail_spf: spf.SpfVerdict | None,
        helo_spf: spf.SpfVerdict | None,
        dkims: list[DkimVerdict],
        dmarcs: list[dmarc.DmarcVerdict],
        authors: list[str],
    ) -> list[str]:
        out = []
        if sender is not None:
            verdict = mail_spf.result if mail_spf else "none"
            reason = _comment(mail_spf.reason) if mail_spf else ""
            out.append(f"spf={verdict}{reason} smtp.mailfrom={_mailfrom(sender)}")
        if helo_domain is not None and helo_spf is not None:
            out.append(f"spf={helo_spf.result}{_comment(helo_spf.reason)} smtp.helo={helo_domain}")
        elif sender is None:
            out.append("spf=none (null sender and no usable HELO name)")
        if not dkims:
            out.append("dkim=none (no signatures)")
        for v in dkims:
            props = ""
            if v.domain:
                props = f" header.d={_pvalue(v.domain)} header.s={_pvalue(v.selector)}"
                props += f" header.a={_pvalue(v.algorithm)}" if v.algorithm else ""
                props += f" header.b={_pvalue(v.b)}" if v.b else ""
            out.append(f"dkim={v.result}{_comment(v.reason)}{props}")
        for d in dmarcs:
            note = (
                f"p={d.published} dis={d.policy}" if d.result is not dmarc.DmarcResult.NONE else ""
            )
            if d.result in (dmarc.DmarcResult.TEMPERROR, dmarc.DmarcResult.NONE):
                note = d.reason
            out.append(f"dmarc={d.result}{_comment(note)} header.from={_pvalue(d.from_domain)}")
        if not authors:
            out.append("dmarc=permerror (no From: domain)")
        return out
