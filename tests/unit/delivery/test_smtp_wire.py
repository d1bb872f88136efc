"""The SMTP client's wire helpers: replies (RFC 5321 §4.2), EHLO, commands, DATA encoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.delivery.smtp_wire import (
    BodyEncoder,
    ProtocolError,
    Reply,
    ReplyParser,
    command,
    mail_command,
    parse_ehlo,
    rcpt_command,
)
from postoffice.mail.address import Address


def test_single_and_multiline_replies_split_anywhere() -> None:
    wire = b"220 mx.example ESMTP\r\n250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    for cut in range(len(wire) + 1):
        parser = ReplyParser()
        replies = parser.feed(wire[:cut]) + parser.feed(wire[cut:])
        assert [r.code for r in replies] == [220, 250]
        assert replies[1].lines == ("mx.example", "PIPELINING", "SIZE 1000")
        assert not parser.pending


def test_bare_lf_and_code_only_lines_are_tolerated() -> None:
    assert ReplyParser().feed(b"250\n354 go\n") == [Reply(250, ("",)), Reply(354, ("go",))]


@pytest.mark.parametrize(
    "wire",
    [
        b"abc hello\r\n",
        b"25\r\n",
        b"250xhello\r\n",
        b"999 no\r\n",
        b"250-a\r\n251 b\r\n",
        b"1" * 9000,
    ],
)
def test_malformed_replies_are_protocol_errors(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(wire)


def test_endless_multiline_reply_is_cut_off() -> None:
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250-x\r\n" * 1000)


def test_reply_classes_and_enhanced_codes() -> None:
    r = Reply(550, ("5.1.1 <bob@x>: user unknown",))
    assert r.permanent and not r.transient and r.enhanced == "5.1.1"
    assert r.text == "550 5.1.1 <bob@x>: user unknown"
    assert Reply(451, ("4.7.1 greylisted",)).transient
    assert Reply(250, ("2.0.0 ok",)).positive
    # An enhanced code whose class disagrees with the reply code is not trusted.
    assert Reply(550, ("2.0.0 odd",)).enhanced is None
    assert Reply(550, ("no code here",)).enhanced is None


def test_parse_ehlo_keywords() -> None:
    reply = Reply(250, ("mx.example greets you", "pipelining", "SIZE 35882577", "STARTTLS", ""))
    assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "35882577", "STARTTLS": ""}


def test_mail_and_rcpt_commands() -> None:
    sender = Address("alice", "example.test")
    assert mail_command(None, size=None, body_8bit=False, smtputf8=False) == b"MAIL FROM:<>\r\n"
    assert mail_command(sender, size=1234, body_8bit=True, smtputf8=True) == (
        b"MAIL FROM:<alice@example.test> SIZE=1234 BODY=8BITMIME SMTPUTF8\r\n"
    )
    assert rcpt_command(Address("j\u00f6rg", "example.test")) == (
        "RCPT TO:<j\u00f6rg@example.test>\r\n".encode()
    )


def test_commands_refuse_injected_line_breaks() -> None:
    with pytest.raises(ValueError):
        command("RCPT TO:<a@b>\r\nRCPT TO:<c@d>")
    with pytest.raises(ValueError):
        rcpt_command(Address('"x\ny"', "example.test"))


def _unstuff(wire: bytes) -> bytes:
    """What a receiver makes of the DATA stream (RFC 5321 §4.5.2)."""
    assert wire.endswith(b".\r\n")
    lines = wire[:-3].splitlines(keepends=True)
    assert all(line.endswith(b"\r\n") for line in lines)
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines)


def test_dot_stuffing_and_crlf() -> None:
    enc = BodyEncoder()
    wire = enc.encode(b".starts\nmid.dle\n..two\n.") + enc.encode(b"\nend") + enc.finish()
    assert wire == b"..starts\r\nmid.dle\r\n...two\r\n..\r\nend\r\n.\r\n"


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"")), max_size=12))
def test_encoding_is_chunking_independent_and_reversible(chunks: list[bytes]) -> None:
    message = b"".join(chunks)
    enc = BodyEncoder()
    wire = b"".join(enc.encode(c) for c in chunks) + enc.finish()
    whole = BodyEncoder()
    assert wire == whole.encode(message) + whole.finish()
    assert b"\r\n.\r\n" not in wire[:-3] and not wire[:-3].startswith(b".\r\n")
    expected = message.replace(b"\n", b"\r\n")
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert _unstuff(wire) == expected
