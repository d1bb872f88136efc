"""Inbound mail authentication on the ``smtp`` listener: SPF, DKIM, DMARC.

The SMTP session asks ``InboundChecks.applies(client_ip)`` when DATA starts
(clients in ``[checks] exempt_networks`` are neither looked up nor judged)
and, at the end of DATA, ``judge(...)`` with the whole message.  The answer
is one ``Authentication-Results`` field (RFC 8601) stamped with our host
name, and possibly a refusal:

* SPF (RFC 7208) of the MAIL FROM identity (the HELO identity for a null
  sender, §2.4) and of the HELO name (§2.3);
* every DKIM signature (RFC 6376; RSA and Ed25519, RFC 8463), at most
  ``MAX_SIGNATURES`` of them, with bounded keys and work (dkim_verify.py);
* DMARC (RFC 7489) for each From: domain, from those two; each verdict for
  a domain that asks for aggregate reports (rua=mailto:) is recorded for
  them (dmarc_store.py), with the disposition applied (§7.2).

Policy, when ``[checks] dmarc_reject`` is on: a DMARC failure whose domain
publishes ``p=reject`` is refused with 550 5.7.1 (§6.6.4 — pct= applied;
with several From: domains, the strictest failing policy applies, §6.6.1),
and so is a message whose author DMARC cannot evaluate (no From:, several
From: fields, an address without a usable domain, too many domains): a
check a sender can step around protects nobody.  Everything else is only
recorded.  A DNS failure never passes silently:
when DMARC did not pass and a lookup that could change that failed for the
moment, the answer is 451 4.7.0 and the sender retries (RFC 7208 §2.6.6,
RFC 6376 §6.1.2, RFC 7489 §6.6.3).

Every name is looked up through the server's resolver (``[relay]
dns_servers``).  DKIM keys are fetched on the event loop first and checked
(RFC 8301 sizes, a small exponent); dkimpy then verifies in a worker process
(cpu_workers.py) with those answers, under a deadline, so it never does DNS
of its own and never stalls the loop, whatever the sender publishes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from postoffice import maillog
from postoffice.config.settings import Settings
from postoffice.dns.resolver import DnsError, Resolver
from postoffice.mail.address import Address
from postoffice.mail.headers import MAX_HEADER_BLOCK, header_block
from postoffice.policy import dmarc, spf
from postoffice.policy.clients import client_address, in_networks
from postoffice.policy.cpu_workers import CpuTimeout, CpuWorkerError, CpuWorkers
from postoffice.policy.dkim_verify import (
    MAX_SIGNATURES,
    TARGET,
    VERIFY_TIMEOUT,
    VERIFY_WORKERS,
    DkimVerdict,
    KeyAnswer,
    decode_verdicts,
    encode_keys,
    is_name,
    key_problem,
    key_record,
    scan_signatures,
    unverified,
)
from postoffice.policy.dmarc_store import AuthResult, Published, ReportRecorder, ReportRow
from postoffice.protocol.smtp_reply import Reply

log = logging.getLogger("postoffice.mailauth")

CHECK_TIMEOUT = 30.0  # seconds for all lookups of one message (RFC 7208 §4.6.4: >= 20)
__all__ = ["MAX_SIGNATURES", "CheckOutcome", "DkimVerdict", "InboundChecks"]


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    header: bytes  # the Authentication-Results field, LF line ends
    reply: Reply | None = None  # a refusal (5xx) or a temporary failure (4xx)
    mail_spf: spf.SpfVerdict | None = None
    helo_spf: spf.SpfVerdict | None = None
    dkim_results: tuple[DkimVerdict, ...] = ()
    dmarc_results: tuple[dmarc.DmarcVerdict, ...] = field(default_factory=tuple)
    # Why the message goes to the Junk folder (a DMARC failure whose domain
    # asks p=quarantine, RFC 7489 §6.3, after pct=), or "" for the inbox.
    quarantine: str = ""


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
    if not name or name.startswith("[") or "." not in name or not is_name(name):
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
        resolver: Resolver,
        *,
        timeout: float = CHECK_TIMEOUT,
        rng: random.Random | None = None,
        dkim_workers: CpuWorkers | None = None,
        reports: ReportRecorder | None = None,
    ) -> None:
        """``dkim_workers``: the processes that verify DKIM signatures
        (default: VERIFY_WORKERS of them, VERIFY_TIMEOUT seconds per message);
        ``reports``: where DMARC verdicts go for aggregate reports (None: nowhere)."""
        self._reports = reports
        self._hostname = settings.hostname
        self._exempt = settings.checks.exempt_networks
        self._dmarc_reject = settings.checks.dmarc_reject
        self._resolver = resolver
        self._timeout = timeout
        self._rng = rng or random.SystemRandom()
        self._dkim_workers = dkim_workers or CpuWorkers(
            TARGET, workers=VERIFY_WORKERS, timeout=VERIFY_TIMEOUT
        )

    def start(self) -> None:
        """Start the DKIM worker processes and load the Public Suffix List
        (0.1 s of CPU) now, not on the event loop with the first message."""
        self._dkim_workers.start()
        dmarc.organizational_domain("postoffice.example")
        if self._reports is not None:
            self._reports.start()

    def close(self) -> None:
        self._dkim_workers.close()
        if self._reports is not None:
            self._reports.close()

    def applies(self, client_ip: str) -> bool:
        """False for clients in ``[checks] exempt_networks`` (and non-IP peers)."""
        address = client_address(client_ip)
        return address is not None and not in_networks(address, self._exempt)

    async def judge(
        self,
        *,
        client_ip: str,
        helo: str,
        sender: Address | None,
        message: bytes,
        queue_id: str | None = None,
    ) -> CheckOutcome:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._judge(client_ip, helo, sender, message, queue_id)
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

    async def _dkim(self, message: bytes, block: bytes) -> list[DkimVerdict]:
        signatures = scan_signatures(block)
        if not signatures:
            return []
        names = list(dict.fromkeys(s.key_name for s in signatures if not s.problem))
        answers = await asyncio.gather(*(self._key(n) for n in names))
        keys = dict(zip(names, answers, strict=True))
        refused = [unverified(s, keys.get(s.key_name)) for s in signatures]
        if all(refused):
            # Nothing to verify (hostile keys end here, refused unread): no
            # worker needed.  dkimpy might count the fields differently, but a
            # signature not verified can only fail to pass, never pass.
            return [v for v in refused if v is not None]
        try:
            return decode_verdicts(await self._dkim_workers.run(encode_keys(keys), message))
        except CpuTimeout:
            # Over the bound nothing legitimate needs (25 MB and five signatures
            # take about 3 s): for the moment, since an overloaded machine
            # could be the cause; the work per attempt stays bounded.
            reason = f"verification took over {self._dkim_workers.timeout:g}s"
        except CpuWorkerError as exc:
            log.warning("mailauth: DKIM verification failed: %s", exc)
            reason = "verifier failed"
        return [s.verdict("temperror", reason) for s in signatures]

    async def _key(self, name: str) -> KeyAnswer:
        """The key record for ``name``, checked before it can reach dkimpy."""
        try:
            record = key_record(await self._resolver.txt(name))
        except DnsError as exc:
            if exc.temporary:
                return KeyAnswer(result="temperror", reason="key lookup failed")
            record = None
        if record is None:
            return KeyAnswer(result="permerror", reason="no key for signature")
        problem = key_problem(record)
        return KeyAnswer(result="permerror", reason=problem) if problem else KeyAnswer(record)

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
        self,
        client_ip: str,
        helo: str,
        sender: Address | None,
        message: bytes,
        queue_id: str | None,
    ) -> CheckOutcome:
        # The session refuses larger header sections before this (MAX_HEADER_BLOCK).
        block = header_block(message[:MAX_HEADER_BLOCK])
        helo_domain = _helo_domain(helo)
        helo_identity = ("postmaster", helo_domain) if helo_domain else None
        mail_identity = (sender.local, sender.domain) if sender is not None else helo_identity
        mail_spf, helo_spf, dkims = await asyncio.gather(
            self._spf(client_ip, mail_identity, helo)
            if sender is not None and mail_identity is not None
            else _nothing(),
            self._spf(client_ip, helo_identity, helo) if helo_identity is not None else _nothing(),
            self._dkim(message, block),
        )
        # DMARC's SPF identity: MAIL FROM, or HELO for a null sender (RFC 7489 §3.1.2).
        dmarc_spf = mail_spf if sender is not None else helo_spf
        authors = dmarc.authors(block)
        dmarcs = list(
            await asyncio.gather(*(self._dmarc(a, dmarc_spf, dkims) for a in authors.domains))
        )
        outcome_reply = self._decide(authors, dmarc_spf, dkims, dmarcs)
        results = self._results(sender, helo_domain, mail_spf, helo_spf, dkims, dmarcs, authors)
        maillog.checks(
            queue_id,
            client=client_ip,
            helo=helo,
            sender=sender,
            spf=dmarc_spf.result if dmarc_spf else "none",
            # d= and From: domains are the sender's choice: logfmt quotes them when odd.
            dkim=",".join(f"{v.result}:{v.domain}" for v in dkims) or "none",
            dmarc=(
                ",".join(f"{v.result}:{v.from_domain}" for v in dmarcs)
                or (f"permerror:{authors.problem}" if authors.problem else "none")
            ),
            result=str(outcome_reply.code) if outcome_reply else "accept",
        )
        quarantine = ""
        if outcome_reply is None and self._dmarc_reject:
            quarantine = next(
                (
                    f"DMARC policy of {v.from_domain} is quarantine"
                    for v in dmarcs
                    if v.result is dmarc.DmarcResult.FAIL and v.policy == "quarantine"
                ),
                "",
            )
        if self._reports is not None:
            self._record(
                client_ip, sender, helo_domain, dmarc_spf, dkims, dmarcs, outcome_reply, quarantine
            )
        return CheckOutcome(
            header=format_header(self._hostname, results),
            reply=outcome_reply,
            quarantine=quarantine,
            mail_spf=mail_spf,
            helo_spf=helo_spf,
            dkim_results=tuple(dkims),
            dmarc_results=tuple(dmarcs),
        )

    def _record(
        self,
        client_ip: str,
        sender: Address | None,
        helo_domain: str | None,
        dmarc_spf: spf.SpfVerdict | None,
        dkims: list[DkimVerdict],
        dmarcs: list[dmarc.DmarcVerdict],
        reply: Reply | None,
        quarantine: str,
    ) -> None:
        """One report row per judged From: domain that asks for reports
        (RFC 7489 §7.2).  The disposition is what happens to the message: a
        refusal rejects it whichever domain caused it; a temporary failure is
        not recorded (the sender retries, and that try is)."""
        assert self._reports is not None
        if reply is not None and reply.code < 500:
            return
        disposition = "reject" if reply is not None else "quarantine" if quarantine else "none"
        spf_results: tuple[AuthResult, ...] = ()
        if dmarc_spf is not None:
            scope = "mfrom" if sender is not None else "helo"
            spf_results = (AuthResult(dmarc_spf.domain, str(dmarc_spf.result), scope),)
        dkim_results = tuple(AuthResult(v.domain, v.result, v.selector) for v in dkims if v.domain)
        ip = client_address(client_ip)
        for v in dmarcs:
            record = v.record
            if record is None or not record.rua:
                continue
            reasons: list[str] = []
            if v.sampled_out:
                reasons.append("sampled_out")  # §6.6.4 pct=
            if v.result is dmarc.DmarcResult.FAIL and disposition == "none" and v.policy != "none":
                reasons.append("local_policy")  # [checks] dmarc_reject = false
            self._reports.record(
                Published(
                    record.domain,
                    record.adkim,
                    record.aspf,
                    record.policy,
                    record.subdomain_policy,
                    record.pct,
                    record.fo,
                    record.rua,
                ),
                ReportRow(
                    source_ip=str(ip) if ip is not None else client_ip,
                    header_from=v.from_domain,
                    envelope_from=sender.domain if sender is not None else helo_domain or "",
                    disposition=disposition,
                    dkim="pass" if v.dkim_aligned else "fail",
                    spf="pass" if v.spf_aligned else "fail",
                    reasons=tuple(reasons),
                    dkim_results=dkim_results,
                    spf_results=spf_results,
                ),
            )

    def _decide(
        self,
        authors: dmarc.Authors,
        dmarc_spf: spf.SpfVerdict | None,
        dkims: list[DkimVerdict],
        dmarcs: list[dmarc.DmarcVerdict],
    ) -> Reply | None:
        if authors.problem and self._dmarc_reject:
            # RFC 7489 §6.6.1: DMARC needs the author's domain; mail whose
            # author escapes the check must not pass for unchecked.
            return Reply(
                550, f"Message refused: {authors.problem}, so DMARC cannot check it", "5.7.1"
            )
        if dmarcs and all(v.result is dmarc.DmarcResult.PASS for v in dmarcs):
            return None  # nothing that failed for the moment could change this
        temporary = [
            *(["SPF"] if dmarc_spf and dmarc_spf.result is spf.SpfResult.TEMPERROR else []),
            *(["DKIM"] if any(v.result == "temperror" for v in dkims) else []),
            *(["DMARC"] if any(v.result is dmarc.DmarcResult.TEMPERROR for v in dmarcs) else []),
        ]
        if temporary:
            return Reply(
                451,
                f"Temporary failure in {', '.join(temporary)} checks, try again later",
                "4.7.0",
            )
        # Several author domains: every one was evaluated, and any failing one
        # whose policy is reject refuses the message (the strictest, §6.6.1).
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
        authors: dmarc.Authors,
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
        if authors.problem:
            out.append(f"dmarc=permerror{_comment(authors.problem)}")
        return out
