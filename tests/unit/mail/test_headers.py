from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.mail.address import Address
from postoffice.mail.headers import (
    HeaderGate,
    authserv_id,
    field_values,
    header_block,
    strip_forged_auth_results,
    trace_headers,
)

RECEIVED = b"Received: from x ([127.0.0.1])\n"


def gate(**kw: object) -> HeaderGate:
    return HeaderGate(
        received=RECEIVED,
        submission=bool(kw.pop("submission", False)),
        hostname="mx.example.test",
        **kw,
    )  # type: ignore[arg-type]


def test_gate_holds_until_blank_line_then_passes_through() -> None:
    g = gate()
    assert g.feed(b"Subject: a\n") == b""
    out = g.feed(b"\nbody\n")
    assert out == RECEIVED + b"Subject: a\n\nbody\n"
    assert g.feed(b"more\n") == b"more\n"
    assert g.finish() == b""


def test_gate_releases_a_headers_only_message_at_finish() -> None:
    g = gate()
    assert g.feed(b"Subject: only headers\n") == b""
    assert g.finish() == RECEIVED + b"Subject: only headers\n"


def test_submission_adds_missing_date_and_message_id_only() -> None:
    g = gate(submission=True)
    out = g.feed(b"From: a@example.test\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nx\n")
    assert out.count(b"Date:") == 1
    assert b"Message-ID: <" in out and b"@mx.example.test>" in out
    g2 = gate(submission=True)
    out2 = g2.feed(b"message-id: <a@b>\n\nx\n")
    assert out2.count(b"essage-") == 1 and b"\nDate: " in out2


def test_hold_all_keeps_everything_and_inserts_extra_after_received() -> None:
    g = gate(hold_all=True)
    assert g.feed(b"Subject: a\n\nbody\n") == b""
    assert g.held() == b"Subject: a\n\nbody\n"
    out = g.finish(b"Authentication-Results: mx.example.test; spf=pass\n")
    assert (
        out == RECEIVED + b"Authentication-Results: mx.example.test; spf=pass\nSubject: a\n\nbody\n"
    )


def test_forged_auth_results_for_our_host_are_removed_others_kept() -> None:
    block = (
        b"Authentication-Results: MX.example.test; dkim=pass\n\t header.d=evil.test\n"
        b"Authentication-Results: other.test; spf=fail\n"
        b"Subject: x\n"
    )
    assert strip_forged_auth_results(block, "mx.example.test") == (
        b"Authentication-Results: other.test; spf=fail\nSubject: x\n"
    )


def test_from_addresses_reads_folded_and_multiple() -> None:
    g = gate(submission=True)
    g.feed(b"From: Alice <alice@example.test>,\n bob@example.test\n\n")
    assert g.from_addresses() == [Address("alice", "example.test"), Address("bob", "example.test")]
    g2 = gate(submission=True)
    g2.feed(b"From: not an address\n\n")
    assert g2.from_addresses() == [None]
    g3 = gate(submission=True)  # email.utils recurses once per "(": refused, not raised
    g3.feed(b"From: " + b"(" * 3000 + b"alice@example.test\n\n")
    assert g3.from_addresses() == [None]


def test_trace_header_sanitises_helo() -> None:
    header = trace_headers(
        helo="evil\r\nX-Injected: 1",
        client_ip="192.0.2.1",
        hostname="mx.test",
        protocol="ESMTP",
        queue_id="abc",
        recipient=None,
        tls=None,
    )
    assert header.count(b"\n") == 3 and b"X-Injected: 1\n" not in header


@pytest.mark.parametrize(
    ("helo", "written"),
    [
        ("a)b(c", "a?b?c"),
        ("(x)", "?x?"),
        ('x"y\\z;w', "x?y?z?w"),
        ("a]b[", "a?b?"),
        ("\u00e9t\u00e9", "?t?"),
        ("mail.example.test", "mail.example.test"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("[not-an-ip]", "?not-an-ip?"),
    ],
)
def test_trace_header_keeps_its_comment_structure_whatever_the_helo(
    helo: str, written: str
) -> None:
    """RFC 5321 §4.4: ``from`` is a domain or an address literal, then one
    comment; a HELO name never opens or closes a comment of its own."""
    header = trace_headers(
        helo=helo,
        client_ip="192.0.2.1",
        hostname="mx.test",
        protocol="ESMTP",
        queue_id="abc",
        recipient=None,
        tls=None,
    ).decode()
    first = header.split("\n")[0]
    assert first == f"Received: from {written} ([192.0.2.1])"


def test_forged_auth_results_hidden_by_folding_or_comments_are_removed() -> None:
    block = (
        b"Authentication-Results:\n\tmx.example.test; dkim=pass; dmarc=pass\n"
        b"Authentication-Results: (x) mx.example.test; spf=pass\n"
        b"Authentication-Results: (a (nested) comment)\n MX.Example.Test ; spf=pass\n"
        b"Authentication-Results: mx.example.test.evil.test; spf=pass\n"
        b"Subject: x\n"
    )
    assert strip_forged_auth_results(block, "mx.example.test") == (
        b"Authentication-Results: mx.example.test.evil.test; spf=pass\nSubject: x\n"
    )


def test_count_fields() -> None:
    from postoffice.mail.headers import count_fields

    assert count_fields(b"Received: a\nreceived: b\n c\nX-Received: d\n", "received") == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b" mx.example.test; dkim=pass\n", b"mx.example.test"),
        (b' "mx.example.test"; dkim=pass\n', b"mx.example.test"),
        (b' "MX.example\\.test" 1; dkim=pass\n', b"mx.example.test"),
        (b" mx.example.test.; dkim=pass\n", b"mx.example.test"),
        (b"\n\t(a (b \\) c) d) mx.example.test(x); spf=pass\n", b"mx.example.test"),
        (b" " + b"(" * 40 + b")" * 40 + b" mx.example.test; x\n", b"mx.example.test"),
        (b" mx.example.test.evil.test; spf=pass\n", b"mx.example.test.evil.test"),
        (b' "unterminated\n', b"unterminated"),
        (b"\n", b""),
    ],
)
def test_authserv_id_reads_tokens_quoted_strings_comments_and_the_root_dot(
    value: bytes, expected: bytes
) -> None:
    assert authserv_id(value) == expected


def test_forged_auth_results_spelled_any_way_are_removed() -> None:
    block = (
        b'Authentication-Results: "mx.example.test"; dkim=pass\n'
        b"Authentication-Results: mx.example.test.; dkim=pass\n"
        b"AUTHENTICATION-results: mx.example.test; dkim=pass\n"
        b"Authentication-Results: other.test; spf=fail\n"
        b"Subject: x\n"
    )
    assert strip_forged_auth_results(block, "mx.example.test") == (
        b"Authentication-Results: other.test; spf=fail\nSubject: x\n"
    )
    alone = b"aUTHENTICATION-rESULTS: mx.example.test; dkim=pass\nSubject: y\n"
    assert strip_forged_auth_results(alone, "mx.example.test") == b"Subject: y\n"


@given(st.binary(max_size=300))
def test_authserv_id_never_fails(value: bytes) -> None:
    assert isinstance(authserv_id(value), bytes)


def test_field_values_unfold_and_keep_order() -> None:
    block = b"DKIM-Signature: a=1;\n\tb=2\nX: y\ndkim-signature :c=3\n"
    assert field_values(block, "DKIM-Signature") == [b"a=1;\tb=2", b"c=3"]
    assert header_block(b"A: b\n\nbody\n") == b"A: b\n"
    assert header_block(b"A: b\n") == b"A: b\n"
