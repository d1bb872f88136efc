"""The SMTP client core: replies (RFC 5321 §4.2) as received, EHLO, commands.

The DATA encoding is the one dot-stuffer's: tests/unit/protocol/test_dotstuff.py.
"""

from __future__ import annotations

import pytest

from postoffice.mail.address import Address
from postoffice.protocol.errors import RemoteProtocolError
from postoffice.protocol.smtp_client import (
    ReplyParser,
    command,
    mail_command,
    parse_ehlo,
    rcpt_command,
)
from postoffice.protocol.smtp_reply import Reply


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
    with pytest.raises(RemoteProtocolError):
        ReplyParser().feed(wire)


def test_endless_multiline_reply_is_cut_off() -> None:
    with pytest.raises(RemoteProtocolError):
        ReplyParser().feed(b"250-x\r\n" * 1000)


def test_reply_classes_and_enhanced_codes() -> None:
    r = Reply.received(550, ("5.1.1 <bob@x>: user unknown",))
    assert r.is_permanent and not r.is_transient and r.enhanced == "5.1.1"
    assert r.summary == "550 5.1.1 <bob@x>: user unknown"
    assert Reply.received(451, ("4.7.1 greylisted",)).is_transient
    assert Reply.received(250, ("2.0.0 ok",)).is_positive
    # An enhanced code whose class disagrees with the reply code is not trusted.
    assert Reply.received(550, ("2.0.0 odd",)).enhanced is None
    assert Reply.received(550, ("no code here",)).enhanced is None


def test_a_received_reply_keeps_its_text_as_sent() -> None:
    """Logs and DSNs quote the peer's own words: every line, with the codes
    where the peer put them, even when it broke RFC 2034 §4's every-line rule."""
    (r,) = ReplyParser().feed(b"550-5.1.1 no such user\r\n550 see https://x.example/why\r\n")
    assert r.enhanced == "5.1.1"  # read from the first line
    assert r.summary == "550 5.1.1 no such user see https://x.example/why"
    (r,) = ReplyParser().feed(b"550-5.1.1 a\r\n550 5.1.1  b \r\n")
    assert r.summary == "550 5.1.1 a 5.1.1  b"
    (r,) = ReplyParser().feed(b"250 \r\n")
    assert r.enhanced is None and r.summary == "250 "


def test_a_received_reply_is_the_reply_it_was() -> None:
    """Written again (``to_bytes``), a received reply is what the peer sent."""
    wire = b"550-5.1.1 no such user\r\n550 5.1.1 bye\r\n"
    (r,) = ReplyParser().feed(wire)
    assert r.to_bytes() == wire
    assert r.to_bytes() == Reply(550, ("no such user", "bye"), "5.1.1").to_bytes()


def test_codes_we_may_not_send_are_still_read() -> None:
    """RFC 5321 §4.2: a client goes by the first digit; x6z-x9z are read
    (our own replies may not use them, see test_reply_code_must_be_valid)."""
    (r,) = ReplyParser().feed(b"261 odd but positive\r\n")
    assert r.code == 261 and r.is_positive
    with pytest.raises(ValueError):
        Reply(261, "x")
    with pytest.raises(ValueError):
        Reply.received(600, ("x",))


def test_parse_ehlo_keywords() -> None:
    reply = Reply(250, ("mx.example greets you", "pipelining", "SIZE 35882577", "STARTTLS", ""))
    assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "35882577", "STARTTLS": ""}
    # A keyword with a control character in it is no keyword we know.
    (received,) = ReplyParser().feed(b"250-mx.example\r\n250 PIPELINING\x00\r\n")
    assert parse_ehlo(received) == {"PIPELINING\x00": ""}


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
