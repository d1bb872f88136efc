"""The mail an aggregate report travels in, for every report kind.

DMARC (RFC 7489 §7.2.1.1, policy/dmarc_report.py) and SMTP TLS reports
(RFC 8460 §5.3, policy/tls_rpt_report.py) send the same shape of mail: a
``Report Domain: D Submitter: S Report-ID: <ID>`` subject, a short text
part, and the gzip'd document as a base64 attachment.  They differ in the
From: name, extra header fields, the multipart type and the attachment's
media type, which the caller gives.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import secrets
from collections.abc import Sequence

from postoffice.mail.address import Address


def compressed(document: bytes) -> bytes:
    # mtime=0: the same report gzips to the same bytes (a re-made one is equal).
    data: bytes = gzip.compress(document, mtime=0)
    return data


def report_mail(
    *,
    report_id: str,
    domain: str,
    submitter: str,
    display: str,
    sender: Address,
    to: Sequence[Address],
    extra_fields: Sequence[tuple[str, str]] = (),
    multipart: str,
    text: str,
    attachment: bytes,
    media_type: str,
    name: str,
    now: float,
) -> bytes:
    """The report mail, LF line endings: ``display`` names the From:,
    ``extra_fields`` follow Message-ID, ``multipart`` is the top
    Content-Type without its boundary, ``text`` the explanatory part."""
    boundary = f"{report_id}.{secrets.token_hex(8)}"
    body = base64.encodebytes(attachment).decode("ascii")  # 76-character lines
    subject = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    fields = "".join(f"{key}: {value}\n" for key, value in extra_fields)
    message = (
        f"From: {display} <{sender}>\n"
        f"To: {', '.join(f'<{a}>' for a in to)}\n"
        f"Subject: {subject}\n"
        f"Date: {email.utils.formatdate(now)}\n"
        f"Message-ID: <{report_id}.{secrets.token_hex(6)}@{submitter}>\n"
        f"{fields}"
        "Auto-Submitted: auto-generated\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: {multipart}; boundary="{boundary}"\n'
        "\n"
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        f"{text}"
        "\n"
        f"--{boundary}\n"
        f'Content-Type: {media_type}; name="{name}"\n'
        "Content-Transfer-Encoding: base64\n"
        f'Content-Disposition: attachment; filename="{name}"\n'
        "\n"
        f"{body}"
        f"--{boundary}--\n"
    )
    return message.encode("ascii")
