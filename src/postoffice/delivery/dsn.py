"""Delivery Status Notifications: bounces, delay warnings, success notices (RFC 3464).

Which notices are sent follows the recipient's NOTIFY (RFC 3461 §4.1,
protocol/dsn_params.py; absent means FAILURE,DELAY): "failed" and
"delayed" (once, after ``[relay] warn_after``) from the queue, "delivered"
when a local mailbox took the message, "relayed" when a next hop without
DSN did (§5.2.2; a hop with DSN got NOTIFY and ORCPT and reports itself).
ENVID goes into Original-Envelope-Id, ORCPT into Original-Recipient
(RFC 3464 §2.2.1, §2.3.1).  RET=FULL returns the whole message with a
failure notice (text/rfc822 of at most MAX_RETURNED octets, else headers
only, RFC 3461 §4.3 allows that); delay and success notices quote headers.

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
MAX_RETURNED = 1024 * 1024  # octets of a message RET=FULL returns whole; larger: headers
# RFC 3464 §2.3.3 actions; a queued recipient's success notice (records.py
# ``notice``) is one of the last three until it is sent.
FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED = (
    "failed",
    "delayed",
    "delivered",
    "relayed",
    "expanded",
)
NOTICE_SENT = "sent"
_HOST_OF_LABEL = re.compile(r"^([^\[\s]+)\[")


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    address: Address
    status: str  # RFC 3463, e.g. "5.1.1"
    diagnostic: str  # the reply or error text
    smtp_reply: bool  # diagnostic is an SMTP reply (Diagnostic-Code: smtp; ...)
    remote: str  # "host[ip]:port" that answered, or ""
    last_attempt: float  # 0: never attempted
    original_recipient: str = ""  # from ORCPT, "rfc822; a@b" (RFC 3464 §2.3.1)


@dataclass(frozen=True, slots=True)
class DsnContext:
    reporting_mta: str  # our host name
    queue_id: str
    sender: Address  # the envelope sender the DSN goes to
    arrival: float
    original_headers: bytes  # LF form, as stored
    envid: str = ""  # ENVID, decoded (RFC 3464 §2.2.1)
    original_message: bytes | None = None  # RET=FULL: the whole message (LF form)


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
    if r.original_recipient:
        lines.insert(0, f"Original-Recipient: {_clean(r.original_recipient)}")
        utf8 = utf8 or not r.original_recipient.isascii()
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
    action: str = "",
) -> bytes:
    """The DSN message (LF line endings), from MAILER-DAEMON to ``ctx.sender``.

    ``action`` (RFC 3464 §2.3.3): FAILED (the default), DELAYED (still
    being retried; ``delayed=True`` says the same), DELIVERED or RELAYED.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    action = action or (DELAYED if delayed else FAILED)
    delayed = action == DELAYED
    host = ctx.reporting_mta
    boundary = f"{ctx.queue_id}/{secrets.token_hex(8)}.{host}"
    blocks = [_recipient_block(r, action, retry_until) for r in recipients]
    returned = ctx.original_message if action == FAILED else None
    if returned is not None and len(returned) > MAX_RETURNED:
        returned = None  # too large to send back whole: headers only (RFC 3461 §4.3)
    quoted = ctx.original_headers if returned is None else returned
    headers_utf8 = not ctx.original_headers.isascii()
    utf8 = headers_utf8 or any(u for _b, u in blocks) or not str(ctx.sender).isascii()
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    if returned is not None:
        headers_type = "message/global" if headers_utf8 else "message/rfc822"
    else:
        headers_type = "message/global-headers" if headers_utf8 else "text/rfc822-headers"
    if action in (DELIVERED, RELAYED, EXPANDED):
        subject = "Successful Mail Delivery Report"
        done = (
            "delivered to the mailbox"
            if action == DELIVERED
            else "expanded by an alias; its members report nothing more"
            if action == EXPANDED
            else "relayed to a system that does not send delivery notifications,\n"
            "so this is the last report you will get"
        )
        intro = (
            f"This is the mail system at host {host}.\n\n"
            "Your message was successfully delivered to the destination(s)\n"
            f"listed below: {done}.\n"
        )
    elif delayed:
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
    description = "Undelivered Message" if returned is not None else "Message Headers"
    envid = f"Original-Envelope-Id: {_clean(ctx.envid)}\n" if ctx.envid else ""
    per_message = (
        envid + f"Reporting-MTA: dns; {host}\n"
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
        f"Content-Description: {description}\n"
        f"Content-Type: {headers_type}\n"
        + ("Content-Transfer-Encoding: 8bit\n" if not quoted.isascii() else "")
        + "\n"
    )
    return text.encode("utf-8") + quoted + f"\n--{boundary}--\n".encode()
