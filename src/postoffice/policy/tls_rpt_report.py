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
* ``report_message``: §5.3: multipart/report; report-type="tlsrpt", the
  Subject ``Report Domain: D Submitter: S Report-ID: <ID>``, the
  TLS-Report-Domain and TLS-Report-Submitter fields, the gzip'd JSON as
  base64 ``application/tlsrpt+gzip``.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import gzip
import json
import secrets
from typing import Any

from postoffice.mail.address import Address
from postoffice.policy.dmarc_report import destinations
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


def compressed(document: bytes) -> bytes:
    # mtime=0: the same report gzips to the same bytes.
    data: bytes = gzip.compress(document, mtime=0)
    return data


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
    name = attachment_name(submitter, report)
    boundary = f"{report.report_id}.{secrets.token_hex(8)}"
    body = base64.encodebytes(attachment).decode("ascii")  # 76-character lines
    subject = (
        f"Report Domain: {report.domain} Submitter: {submitter} Report-ID: <{report.report_id}>"
    )
    text = (
        f"From: TLS reports <{sender}>\n"
        f"To: {', '.join(f'<{a}>' for a in to)}\n"
        f"Subject: {subject}\n"
        f"Date: {email.utils.formatdate(now)}\n"
        f"Message-ID: <{report.report_id}.{secrets.token_hex(6)}@{submitter}>\n"
        f"TLS-Report-Domain: {report.domain}\n"
        f"TLS-Report-Submitter: {submitter}\n"
        "Auto-Submitted: auto-generated\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"\n'
        "\n"
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        f"This is an SMTP TLS report (RFC 8460) from {submitter} for {report.domain},\n"
        f"covering {_time(report.begin)} to {_time(report.end)}.\n"
        "\n"
        f"--{boundary}\n"
        f'Content-Type: application/tlsrpt+gzip; name="{name}"\n'
        "Content-Transfer-Encoding: base64\n"
        f'Content-Disposition: attachment; filename="{name}"\n'
        "\n"
        f"{body}"
        f"--{boundary}--\n"
    )
    return text.encode("ascii")
