"""DSNs (RFC 3464): multipart/report with a delivery-status part and the original headers."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from email.message import EmailMessage

from postoffice.delivery.dsn import DsnContext, DsnRecipient, build_dsn
from postoffice.mail.address import Address

CTX = DsnContext(
    reporting_mta="mail.example.test",
    queue_id="19c0ffee1234abcd",
    sender=Address("alice", "example.test"),
    arrival=1_700_000_000.0,
    original_headers=b"From: alice@example.test\nTo: bob@remote.test\nSubject: lunch?\n",
)
BOB = DsnRecipient(
    address=Address("bob", "remote.test"),
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@remote.test>: Recipient address rejected",
    smtp_reply=True,
    remote="mx1.remote.test[127.0.0.2]:25",
    last_attempt=1_700_000_100.0,
)


def parse(data: bytes) -> EmailMessage:
    assert b"\r" not in data  # the queue stores LF form
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def status_groups(part: EmailMessage) -> list[dict[str, str]]:
    # message/delivery-status: per-message fields, then a block per recipient.
    groups = []
    for block in part.get_payload():  # type: ignore[union-attr]
        groups.append({k.lower(): str(v) for k, v in block.items()})
    return groups


def test_failure_dsn_structure() -> None:
    msg = parse(build_dsn(CTX, [BOB], now=1_700_000_200.0))
    assert msg["To"].addresses[0].addr_spec == "alice@example.test"
    assert "MAILER-DAEMON@mail.example.test" in msg["From"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text, status, headers = msg.get_payload()  # type: ignore[misc]
    assert text.get_content_type() == "text/plain"
    assert "bob@remote.test" in text.get_content()
    assert "mx1.remote.test" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status_groups(status)
    assert per_message["reporting-mta"] == "dns; mail.example.test"
    assert per_rcpt["final-recipient"] == "rfc822; bob@remote.test"
    assert per_rcpt["action"] == "failed"
    assert per_rcpt["status"] == "5.1.1"
    assert per_rcpt["remote-mta"] == "dns; mx1.remote.test"
    assert per_rcpt["diagnostic-code"].startswith("smtp; 550 5.1.1")
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: lunch?" in headers.get_content()


def test_several_recipients_and_a_local_diagnostic() -> None:
    carol = DsnRecipient(
        Address("carol", "gone.test"), "5.1.2", "domain gone.test does not exist", False, "", 0.0
    )
    msg = parse(build_dsn(CTX, [BOB, carol], now=1_700_000_200.0))
    _text, status, _headers = msg.get_payload()  # type: ignore[misc]
    groups = status_groups(status)
    assert [g.get("final-recipient") for g in groups[1:]] == [
        "rfc822; bob@remote.test",
        "rfc822; carol@gone.test",
    ]
    assert groups[2]["diagnostic-code"] == "X-Postoffice; domain gone.test does not exist"
    assert "remote-mta" not in groups[2]


def test_delay_warning() -> None:
    bob = DsnRecipient(BOB.address, "4.4.1", "connect to mx: Connection refused", False, "", 1.0)
    msg = parse(
        build_dsn(CTX, [bob], now=1_700_014_400.0, delayed=True, retry_until=1_700_432_000.0)
    )
    assert "Delayed" in msg["Subject"]
    _text, status, _headers = msg.get_payload()  # type: ignore[misc]
    rcpt = status_groups(status)[1]
    assert rcpt["action"] == "delayed" and rcpt["status"] == "4.4.1"
    assert "will-retry-until" in rcpt


def test_utf8_addresses_use_the_global_types() -> None:
    ctx = DsnContext(
        CTX.reporting_mta,
        CTX.queue_id,
        Address("j\u00f6rg", "example.test"),
        CTX.arrival,
        "Subject: gr\u00fc\u00dfe\n".encode(),
    )
    data = build_dsn(ctx, [BOB], now=CTX.arrival)
    assert b"message/global-delivery-status" in data
    assert b"message/global-headers" in data
    assert "To: <j\u00f6rg@example.test>".encode() in data


def test_reply_text_cannot_inject_fields() -> None:
    evil = DsnRecipient(BOB.address, "5.0.0", "550 no\r\nAction: delivered\nX: y", True, "", 0.0)
    data = build_dsn(CTX, [evil], now=CTX.arrival)
    assert b"\nAction: delivered" not in data


def test_forwarded_mail_quotes_only_a_bounded_header_summary() -> None:
    """#11 item 10: the bounce of forwarded mail goes to a sender that may be
    forged; it quotes identifying fields only, each and all bounded."""
    from postoffice.delivery.dsn import (
        MAX_FORWARDED_HEADER_COPY,
        MAX_SUMMARY_FIELD,
        summary_headers,
    )

    junk = b"".join(b"X-Junk-%d: " % i + b"spam " * 180 + b"\n" for i in range(70))
    header = (
        b"Received: from evil.example by us\n\tfolded on\n"
        b"From: someone@elsewhere.test\n"
        b"Subject: caf\xc3\xa9 " + "é".encode() * 600 + b"\n"
        b"To: a@example.test,\n b@example.test\n" + junk + b"Message-ID: <m@x>\n"
        b"References: " + b"<r@x> " * 2000 + b"\n"
    )
    summary = summary_headers(header)
    assert summary.startswith(b"From: someone@elsewhere.test\nSubject: caf\xc3\xa9 ")
    assert b"To: a@example.test,\n b@example.test\n" in summary  # folded field kept whole
    assert b"Message-ID: <m@x>\n" in summary
    assert b"X-Junk" not in summary and b"Received" not in summary
    fields = summary.split(b"\nReferences: ")
    assert len(fields) == 2 and len(b"References: " + fields[1]) <= MAX_SUMMARY_FIELD
    assert len(summary) <= MAX_FORWARDED_HEADER_COPY
    assert summary.endswith(b"\n")
    summary.decode("utf-8")  # cut at a character boundary, never inside one
    msg = parse(build_dsn(dataclasses.replace(CTX, original_headers=summary), [BOB], now=1.0))
    assert msg.get_payload()[2].get_content_type() == "message/global-headers"  # type: ignore[index]
