"""One DMARC aggregate report (RFC 7489 §7.2): its XML, its file, its message,
and where it may go.

* ``feedback_xml``: the Appendix C document (report_metadata, policy_published
  as seen, one ``record`` per row), built with ElementTree so every value the
  sender chose (From: domains, DKIM selectors) is escaped.
* ``attachment_name``: ``receiver!policy-domain!begin!end.xml.gz`` (§7.2.1.1).
* ``report_message`` (through policy/report_mail.py, shared with TLS
  reports): multipart/mixed, subject
  ``Report Domain: D Submitter: S Report-ID: <ID>``, the gzip'd XML as a
  base64 ``application/gzip`` attachment (§7.2.1.1).
* ``destinations``: the rua= mailto: URIs with their size limits (``!10m``,
  §6.2); ``verified``: a destination outside the policy domain's
  organizational domain is used only if ``<policy-domain>._report._dmarc.<rua
  domain>`` publishes v=DMARC1 (§7.1), so nobody can make us mail reports to a
  third party.
"""

from __future__ import annotations

import email.utils
import enum
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from postoffice.dns.resolver import DnsError, Resolver
from postoffice.mail.address import Address, AddressError, parse_mailbox
from postoffice.policy.dmarc import is_dmarc_record, organizational_domain
from postoffice.policy.dmarc_store import SealedReport
from postoffice.policy.report_mail import report_mail

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class Destination:
    address: Address
    max_size: int | None  # bytes of the report (§6.2: "the maximum size ... it will accept")


def destinations(rua: tuple[str, ...]) -> list[Destination]:
    """The usable mailto: URIs of rua= (§6.2 ``dmarc-uri``: URI ["!" size
    [unit]]).  An address that does not parse is skipped."""
    out = []
    for uri in rua:
        target, _bang, size = uri[len("mailto:") :].partition("!")
        target = target.split("?", 1)[0]  # RFC 6068 hfields: none apply to a report
        limit = None
        size = size.strip().lower()
        if size:
            unit = _UNITS.get(size[-1], 1)
            digits = size[:-1] if size[-1] in _UNITS else size
            if not digits.isdigit():
                continue
            limit = int(digits) * unit
        try:
            address = parse_mailbox(email.utils.unquote(target.strip()).replace("%40", "@"))
        except AddressError:
            continue
        out.append(Destination(address, limit))
    return out


class Verification(enum.Enum):
    OK = "ok"
    REFUSED = "refused"  # no v=DMARC1 at <policy>._report._dmarc.<rua domain>
    TEMPORARY = "temporary"  # DNS failed for the moment: try again later


async def verified(resolver: Resolver, policy_domain: str, rua_domain: str) -> Verification:
    """§7.1: reports to a domain outside the policy domain's organizational
    domain need that domain's consent, published in DNS."""
    if organizational_domain(policy_domain) == organizational_domain(rua_domain):
        return Verification.OK
    try:
        found = await resolver.txt(f"{policy_domain}._report._dmarc.{rua_domain}")
    except DnsError as exc:
        return Verification.TEMPORARY if exc.temporary else Verification.REFUSED
    return Verification.OK if any(is_dmarc_record(t) for t in found) else Verification.REFUSED


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def feedback_xml(report: SealedReport, *, org_name: str, email_address: str) -> bytes:
    """The Appendix C ``feedback`` document."""
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", org_name)
    _sub(meta, "email", email_address)
    _sub(meta, "report_id", report.report_id)
    dates = _sub(meta, "date_range")
    _sub(dates, "begin", report.begin)
    _sub(dates, "end", report.end)
    if report.overflow:
        _sub(meta, "error", f"{report.overflow} message(s) not itemised: over the row limit")
    pub = report.published
    policy = _sub(root, "policy_published")
    for tag, value in (
        ("domain", pub.domain),
        ("adkim", pub.adkim),
        ("aspf", pub.aspf),
        ("p", pub.p),
        ("sp", pub.sp),
        ("pct", pub.pct),
        ("fo", pub.fo),
    ):
        _sub(policy, tag, value)
    for row, count in report.rows:
        record = _sub(root, "record")
        item = _sub(record, "row")
        _sub(item, "source_ip", row.source_ip)
        _sub(item, "count", count)
        evaluated = _sub(item, "policy_evaluated")
        _sub(evaluated, "disposition", row.disposition)
        _sub(evaluated, "dkim", row.dkim)
        _sub(evaluated, "spf", row.spf)
        for reason in row.reasons:
            _sub(_sub(evaluated, "reason"), "type", reason)
        ids = _sub(record, "identifiers")
        _sub(ids, "envelope_from", row.envelope_from)
        _sub(ids, "header_from", row.header_from)
        results = _sub(record, "auth_results")
        for a in row.dkim_results:
            dkim = _sub(results, "dkim")
            _sub(dkim, "domain", a.domain)
            if a.selector:
                _sub(dkim, "selector", a.selector)
            _sub(dkim, "result", a.result)
        for a in row.spf_results:
            spf = _sub(results, "spf")
            _sub(spf, "domain", a.domain)
            _sub(spf, "scope", a.selector)
            _sub(spf, "result", a.result)
        if not row.spf_results:  # the schema wants one spf result (minOccurs=1)
            spf = _sub(results, "spf")
            _sub(spf, "domain", row.envelope_from)
            _sub(spf, "result", "none")
    ET.indent(root)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document + b"\n"


def attachment_name(receiver: str, report: SealedReport) -> str:
    """§7.2.1.1: filename = receiver "!" policy-domain "!" begin "!" end ".xml.gz"."""
    return f"{receiver}!{report.domain}!{report.begin}!{report.end}.xml.gz"


def report_message(
    report: SealedReport,
    *,
    receiver: str,
    sender: Address,
    to: list[Address],
    attachment: bytes,
    now: float,
) -> bytes:
    """The report mail (§7.2.1.1), LF line endings."""
    text = (
        f"This is a DMARC aggregate report (RFC 7489 section 7.2) from {receiver}\n"
        f"for {report.domain}, covering {email.utils.formatdate(report.begin, usegmt=True)}\n"
        f"to {email.utils.formatdate(report.end, usegmt=True)}.\n"
    )
    return report_mail(
        report_id=report.report_id,
        domain=report.domain,
        submitter=receiver,
        display="DMARC reports",
        sender=sender,
        to=to,
        multipart="multipart/mixed",
        text=text,
        attachment=attachment,
        media_type="application/gzip",
        name=attachment_name(receiver, report),
        now=now,
    )
