"""Internationalised domains (IDNA 2008 + UTS #46) over a real SMTP connection.

IDNA 2003 -- Python's ``"idna"`` codec -- maps ``faß`` to ``fass``: mail for
``alice@faß.test`` would land in the mailbox of ``alice@fass.test``, another
domain with another owner.  IDNA 2008 keeps ß (``xn--fa-hia``), and refuses
labels it disallows (symbols, misplaced joiners) as address syntax errors:
501 5.1.3 for a recipient, 501 5.1.7 for a sender (RFC 3463).
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

MESSAGE = b"From: jorg@remote.test\r\nSubject: idna\r\n\r\nHallo.\r\n"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path, domains=("fass.test", "Bücher.test"))
    server.add_user("alice@fass.test", "alice-password-1")
    server.add_user("bob@BÜCHER.test", "bob-password-2")  # the CLI maps it too
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(server: PostofficeServer) -> RawSmtp:
    c = RawSmtp("127.0.0.1", server.ports["smtp"])
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def test_eszett_is_not_folded_into_another_domain(srv: PostofficeServer) -> None:
    c = client(srv)
    assert c.cmd("MAIL FROM:<jorg@remote.test> SMTPUTF8")[0] == 250
    code, lines = c.cmd("RCPT TO:<alice@faß.test>".encode())
    # xn--fa-hia.test is not one of ours: relaying is refused, and it is
    # certainly not alice@fass.test's mailbox.
    assert (code, lines[0][:5]) == (554, "5.7.1"), lines
    assert c.cmd("QUIT")[0] == 221
    assert srv.messages("alice@fass.test") == []


def test_u_labels_reach_the_a_label_mailbox(srv: PostofficeServer) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
        s.sendmail("jorg@remote.test", ["bob@bücher.test"], MESSAGE, mail_options=["SMTPUTF8"])
        s.sendmail("jorg@remote.test", ["bob@xn--bcher-kva.test"], MESSAGE)
    assert len(srv.messages("bob@xn--bcher-kva.test")) == 2
    assert "bob@xn--bcher-kva.test" in srv.cli("user", "list").stdout.split()


@pytest.mark.parametrize("domain", ["☃.test", "a\u00b7b.test", "\u0663\u0661x.test"])
def test_disallowed_labels_are_address_syntax_errors(srv: PostofficeServer, domain: str) -> None:
    c = client(srv)
    code, lines = c.cmd(f"MAIL FROM:<jorg@{domain}> SMTPUTF8".encode())
    assert (code, lines[0][:5]) == (501, "5.1.7"), lines
    assert c.cmd("MAIL FROM:<jorg@remote.test> SMTPUTF8")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<alice@{domain}>".encode())
    assert (code, lines[0][:5]) == (501, "5.1.3"), lines
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    assert c.cmd("QUIT")[0] == 221
