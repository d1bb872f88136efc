"""One SMTP TLS report (RFC 8460): where it goes, its JSON, its file, its message.

* ``reporting_uris``: the ``rua=`` of the one ``v=TLSRPTv1`` record at
  ``_smtp._tls.<policy domain>`` (§3: records not starting so are
  discarded; with not exactly one left the domain does not take reports);
  ``mail_destinations``: its mailto: URIs as addresses (parsed as
  policy/dmarc_report.py parses DMARC's).  https: URIs (§3, POST of the
  gzip'd JSON) are not used: only mail is sent.
* ``report_json``: the §4.4 document (organization-name, date-range as
  RFC 3339 UTC times, contact-info, report-id, one ``policies`` entry per
  policy with its summary and failure-details).
* ``attachment_name``: ``submitter!policy-domain!begin!end.json.gz`` (§5.1).
* ``report_message`` (through policy/report_mail.py, shared with DMARC):
  §5.3: multipart/report; report-type="tlsrpt", the
  Subject ``Report Domain: D Submitter: S Report-ID: <ID>``, the
  TLS-Report-Domain and TLS-Report-Submitter fields, the gzip'd JSON as
  base64 ``application/tlsrpt+gzip``.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from postoffice.mail.address import Address
from postoffice.policy.dmarc_report import destinations
from postoffice.policy.report_mail import report_mail
from postoffice.policy.tls_rpt_store import SealedReport

VERSION = "v=TLSRPTv1"


def reporting_uris(records: list[str]) -> tuple[str, ...]:
    """The rua= URIs of the domain's TLSRPT record (§3), () if it has none usable."""
    found = [r for r in records if r.startswith(VERSION + ";") or r == VERSION]
    if len(found) != 1:
        return ()
    for field in found[0].split(";")[1:]:
        name, sep, value = field.partition("=")
        if sep and name.strip() == "rua":
            return tuple(u.strip() for u in value.split(",") if u.strip())
    return ()


def mail_destinations(uris: tuple[str, ...]) -> list[Address]:
    out: list[Address] = []
    for dest in destinations(tuple(u for u in uris if u.lower().startswith("mailto:"))):
        if dest.address not in out:
            out.append(dest.address)
    return out


def _time(seconds: int) -> str:
    """§4.4 date-range: RFC 3339 date-time, in UTC."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def report_json(report: SealedReport, *, organization: str, contact: str) -> bytes:
    """The §4.4 report document."""
    policies: list[dict[str, Any]] = []
    for counts in report.policies:
        policy: dict[str, Any] = {
            "policy-type": counts.policy.type,
            "policy-domain": counts.policy.domain,
        }
        if counts.policy.strings:
            policy["policy-string"] = list(counts.policy.strings)
        if counts.policy.mx_hosts:
            policy["mx-host"] = list(counts.policy.mx_hosts)
        details = []
        for failure, count in counts.details:
            detail: dict[str, Any] = {"result-type": failure.result_type}
            for name, value in (
                ("sending-mta-ip", failure.sending_ip),
                ("receiving-mx-hostname", failure.mx_host),
                ("receiving-ip", failure.receiving_ip),
            ):
                if value:
                    detail[name] = value
            detail["failed-session-count"] = count
            if failure.reason:
                detail["failure-reason-code"] = failure.reason
            details.append(detail)
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": counts.successes,
                "total-failure-session-count": counts.failures,
            },
        }
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    document = {
        "organization-name": organization,
        "date-range": {
            "start-datetime": _time(report.begin),
            "end-datetime": _time(report.end),
        },
        "contact-info": contact,
        "report-id": report.report_id,
        "policies": policies,
    }
    return json.dumps(document, indent=1).encode("utf-8") + b"\n"


def attachment_name(submitter: str, report: SealedReport) -> str:
    """§5.1: sender "!" policy-domain "!" datetime-begin "!" datetime-end ".json.gz"."""
    return f"{submitter}!{report.domain}!{report.begin}!{report.end}.json.gz"


def report_message(
    report: SealedReport,
    *,
    submitter: str,
    sender: Address,
    to: list[Address],
    attachment: bytes,
    now: float,
) -> bytes:
    """The report mail (§5.3), LF line endings."""
    text = (
        f"This is an SMTP TLS report (RFC 8460) from {submitter} for {report.domain},\n"
        f"covering {_time(report.begin)} to {_time(report.end)}.\n"
    )
    return report_mail(
        report_id=report.report_id,
        domain=report.domain,
        submitter=submitter,
        display="TLS reports",
        sender=sender,
        to=to,
        extra_fields=(("TLS-Report-Domain", report.domain), ("TLS-Report-Submitter", submitter)),
        multipart='multipart/report; report-type="tlsrpt"',
        text=text,
        attachment=attachment,
        media_type="application/tlsrpt+gzip",
        name=attachment_name(submitter, report),
        now=now,
    )
