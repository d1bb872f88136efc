"""Delivery Status Notifications: bounces and delay warnings (RFC 3464).

A DSN is a multipart/report (RFC 6522) with three parts: a human-readable
explanation, a message/delivery-status with one block per recipient, and
the original message's header (text/rfc822-headers; RFC 3464 §2 allows
returning only the headers, which keeps bounces small and never re-sends
the content).  When an address or the original header is not ASCII, the
RFC 6533 forms are used (utf-8 address type, message/global-*).

DSNs are sent from the null reverse-path (RFC 5321 §4.5.5), so they can
never cause another DSN: the queue does not bounce a bounce.  They carry
``Auto-Submitted: auto-replied`` (RFC 3834 §5) for the same reason.

Mail an alias forwarded off-site came from anyone on the internet, and its
sender may be forged: its bounce is backscatter to whoever was named.  So
its DSN quotes less still (``summary_headers``): only the fields that tell
the real sender which message it was (From, To, Cc, Date, Subject,
Message-ID, In-Reply-To, References), each at most 998 octets, at most
MAX_FORWARDED_HEADER_COPY in all, never the content (RET=HDRS, RFC 3461
§4.3) nor the other fields a spammer could fill with 64 KiB of text.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from postoffice.mail.address import Address

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# A header field with its folded continuation lines (LF form).
_FIELD = re.compile(rb"^[^ \t\n][^\n]*\n(?:[ \t][^\n]*\n)*", re.MULTILINE)
_SUMMARY_FIELDS = frozenset(
    {b"from", b"to", b"cc", b"date", b"subject", b"message-id", b"in-reply-to", b"references"}
)
MAX_SUMMARY_FIELD = 998  # octets of one quoted field (RFC 5322 §2.1.1's line limit)
MAX_FORWARDED_HEADER_COPY = 4096  # octets of header quoted in a forwarded message's DSN
_HOST_OF_LABEL = re.compile(r"^([^\[\s]+)\[")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    address: Address
    status: str  # RFC 3463, e.g. "5.1.1"
    diagnostic: str  # the reply or error text
    smtp_reply: bool  # diagnostic is an SMTP reply (Diagnostic-Code: smtp; ...)
    remote: str  # "host[ip]:port" that answered, or ""
    last_attempt: float  # 0: never attempted


@dataclass(frozen=True, slots=True)
class DsnContext:
    reporting_mta: str  # our host name
    queue_id: str
    sender: Address  # the envelope sender the DSN goes to
    arrival: float
    original_headers: bytes  # LF form, as stored


def summary_headers(header: bytes, limit: int = MAX_FORWARDED_HEADER_COPY) -> bytes:
    """The identifying fields of ``header`` (LF form, as ``header_section``
    gives it), each cut to MAX_SUMMARY_FIELD octets, at most ``limit`` in all."""
    out = bytearray()
    for match in _FIELD.finditer(header):
        field = match.group(0)
        if field.split(b":", 1)[0].strip().lower() not in _SUMMARY_FIELDS:
            continue
        if len(field) > MAX_SUMMARY_FIELD:
            # Cut whole characters only (a header may be UTF-8, RFC 6532).
            cut = field[: MAX_SUMMARY_FIELD - 1].decode("utf-8", "ignore").encode("utf-8")
            field = cut.rstrip(b"\n") + b"\n"
        if len(out) + len(field) <= limit:
            out += field
    return bytes(out)


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False, usegmt=True)


def _address_field(address: Address) -> tuple[str, bool]:
    """("rfc822; a@b", False) or, for a non-ASCII address, ("utf-8; ...", True)."""
    text = str(address)
    if text.isascii():
        return f"rfc822; {text}", False
    return f"utf-8; {text}", True  # RFC 6533 §3


def _remote_host(label: str) -> str:
    m = _HOST_OF_LABEL.match(label)
    return m.group(1) if m else label


def _recipient_block(r: DsnRecipient, action: str, retry_until: float | None) -> tuple[str, bool]:
    field, utf8 = _address_field(r.address)
    lines = [f"Final-Recipient: {field}", f"Action: {action}", f"Status: {r.status}"]
    if r.remote:
        lines.append(f"Remote-MTA: dns; {_clean(_remote_host(r.remote))}")
    kind = "smtp" if r.smtp_reply else "X-Postoffice"
    if r.diagnostic:
        lines.append(f"Diagnostic-Code: {kind}; {_clean(r.diagnostic)}")
    if r.last_attempt:
        lines.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
    if retry_until is not None:
        lines.append(f"Will-Retry-Until: {_date(retry_until)}")
    return "\n".join(lines) + "\n", utf8


def build_dsn(
    ctx: DsnContext,
    recipients: Sequence[DsnRecipient],
    *,
    now: float,
    delayed: bool = False,
    retry_until: float | None = None,
) -> bytes:
    """The DSN message (LF line endings), from MAILER-DAEMON to ``ctx.sender``.

    ``delayed``: a warning that delivery is still being retried (Action:
    delayed), else a failure report (Action: failed).
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    host = ctx.reporting_mta
    boundary = f"{ctx.queue_id}/{secrets.token_hex(8)}.{host}"
    action = "delayed" if delayed else "failed"
    blocks = [_recipient_block(r, action, retry_until) for r in recipients]
    headers_utf8 = not ctx.original_headers.isascii()
    utf8 = headers_utf8 or any(u for _b, u in blocks) or not str(ctx.sender).isascii()
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if headers_utf8 else "text/rfc822-headers"
    if delayed:
        subject = "Delayed Mail (still being retried)"
        intro = (
            "This is the mail system at host {host}.\n\n"
            "Your message could not be delivered yet to the recipients below.\n"
            "It is still in the queue and delivery will be tried again"
            "{until}.  You do not need to send it again.\n"
        ).format(host=host, until=f" until {_date(retry_until)}" if retry_until else "")
    else:
        subject = "Undelivered Mail Returned to Sender"
        intro = (
            f"This is the mail system at host {host}.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.  The reasons are below;\n"
            "the headers of your message are attached.\n"
        )
    explanations = "\n".join(
        f"<{r.address}>: "
        + (f"host {_remote_host(r.remote)} said: " if r.remote and r.smtp_reply else "")
        + _clean(r.diagnostic or r.status)
        for r in recipients
    )
    per_message = (
        f"Reporting-MTA: dns; {host}\n"
        f"X-Postoffice-Queue-ID: {ctx.queue_id}\n"
        f"Arrival-Date: {_date(ctx.arrival)}\n"
    )
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>\n"
        f"To: <{ctx.sender}>\n"
        f"Subject: {subject}\n"
        f"Date: {_date(now)}\n"
        f"Message-ID: <{ctx.queue_id}.{secrets.token_hex(6)}@{host}>\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        "\n"
        "This is a MIME-encapsulated message.\n"
        "\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=utf-8\n"
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}\n"
        "\n"
        f"{intro}\n{explanations}\n"
        "\n"
        f"--{boundary}\n"
        "Content-Description: Delivery report\n"
        f"Content-Type: {status_type}\n"
        "\n"
        f"{per_message}\n" + "\n".join(b for b, _u in blocks) + "\n"
        f"--{boundary}\n"
        "Content-Description: Undelivered Message Headers\n"
        f"Content-Type: {headers_type}\n"
        "\n"
    )
    return text.encode("utf-8") + ctx.original_headers + f"\n--{boundary}--\n".encode()
