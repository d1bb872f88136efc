"""Postmaster is per domain (#11 item 11), over real SMTP.

Two tenants on one server: tenant-a.test (the first configured domain) has
a postmaster, tenant-b.test has none yet.  tenant-a's postmaster must not
send as postmaster@tenant-b (553, on MAIL FROM and on From:), nor receive
tenant-b's postmaster mail; once tenant-b has its own, that mail goes there
only.  The bare ``<postmaster>`` (RFC 5321 §4.1.1.3) is accepted and
delivered to the server's postmaster.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import submission, wait_for
from tests.support.server import PostofficeServer

PM_A, PM_A_PW = "pm@tenant-a.test", "pm-a-password-1"
BOB_B, BOB_B_PW = "bob@tenant-b.test", "bob-b-password-2"


@pytest.fixture
def tenants(tmp_path: Path) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(tmp_path, domains=("tenant-a.test", "tenant-b.test"))
    srv.add_user(PM_A, PM_A_PW)
    srv.add_user(BOB_B, BOB_B_PW)
    srv.cli("alias", "add", "postmaster@tenant-a.test", PM_A)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def rcpt(srv: PostofficeServer, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
        client.ehlo("client.elsewhere.test")
        client.mail("someone@elsewhere.test")
        return client.rcpt(address)


def send(srv: PostofficeServer, address: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
        client.sendmail(
            "someone@elsewhere.test",
            [address],
            f"From: someone@elsewhere.test\r\nSubject: {subject}\r\n\r\nhi\r\n".encode(),
        )


def subjects(srv: PostofficeServer, address: str) -> list[bytes]:
    found = []
    for p in srv.messages(address):
        for line in p.read_bytes().split(b"\n"):
            if line.startswith(b"Subject: "):
                found.append(line[9:])
    return found


def test_a_postmaster_cannot_send_as_another_domains_postmaster(
    tenants: PostofficeServer,
) -> None:
    client = submission(tenants, PM_A, PM_A_PW)
    code, lines = client.cmd("MAIL FROM:<postmaster@tenant-b.test>")
    assert (code, lines[0][:5]) == (553, "5.7.1"), lines
    # Its own domain's postmaster, yes: the alias delivers to it.
    assert client.cmd("MAIL FROM:<postmaster@tenant-a.test>")[0] == 250
    assert client.cmd("RSET")[0] == 250
    # Nor as From: (which DKIM would sign with tenant-b's key).
    assert client.cmd(f"MAIL FROM:<{PM_A}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{BOB_B}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"From: postmaster@tenant-b.test\r\nSubject: forged\r\n\r\nx\r\n.\r\n")
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (553, "5.7.1"), lines
    client.cmd("QUIT")
    assert subjects(tenants, BOB_B) == []


def test_postmaster_mail_stays_in_its_domain(tenants: PostofficeServer) -> None:
    # tenant-b has no postmaster yet: deferred (451), not handed to tenant-a's.
    code, text = rcpt(tenants, "postmaster@tenant-b.test")
    assert (code, text[:5]) == (451, b"4.3.0"), text
    assert wait_for(lambda: "no postmaster for tenant-b.test" in tenants.log())
    assert subjects(tenants, PM_A) == []
    # Once tenant-b makes one, its postmaster mail goes there and only there.
    tenants.cli("alias", "add", "postmaster@tenant-b.test", BOB_B)
    send(tenants, "Postmaster@tenant-b.test", "for b's postmaster")
    send(tenants, "postmaster@tenant-a.test", "for a's postmaster")
    assert subjects(tenants, BOB_B) == [b"for b's postmaster"]
    assert subjects(tenants, PM_A) == [b"for a's postmaster"]
    # A new domain is told it needs its own.
    added = tenants.cli("domain", "add", "tenant-c.test")
    assert "postoffice alias add postmaster@tenant-c.test" in added.stderr
    assert rcpt(tenants, "postmaster@tenant-c.test")[0] == 451
    # And tenant-b's postmaster may send as it now; tenant-a's still not.
    client = submission(tenants, BOB_B, BOB_B_PW)
    assert client.cmd("MAIL FROM:<postmaster@tenant-b.test>")[0] == 250
    client.cmd("QUIT")
    client = submission(tenants, PM_A, PM_A_PW)
    assert client.cmd("MAIL FROM:<postmaster@tenant-b.test>")[0] == 553
    client.cmd("QUIT")


def test_bare_postmaster_is_accepted_and_delivered(tenants: PostofficeServer) -> None:
    # RFC 5321 §4.1.1.3 / §4.5.1: "RCPT TO:<Postmaster>" with no domain.
    assert rcpt(tenants, "<Postmaster>")[0] == 250
    send(tenants, "postmaster", "to the bare postmaster")
    # The server's postmaster: the first configured domain's (the host name
    # mail.example.test is not a local domain here).
    assert subjects(tenants, PM_A) == [b"to the bare postmaster"]
    (stored,) = tenants.messages(PM_A)
    assert b"Delivered-To: pm@tenant-a.test\n" in stored.read_bytes()


def test_bare_postmaster_is_the_host_names_when_it_is_local(tmp_path: Path) -> None:
    srv = PostofficeServer(
        tmp_path,
        domains=("tenant-a.test", "tenant-b.test"),
        hostname="tenant-b.test",
    )
    srv.add_user(PM_A, PM_A_PW)
    srv.add_user(BOB_B, BOB_B_PW)
    srv.cli("alias", "add", "postmaster@tenant-a.test", PM_A)
    srv.cli("alias", "add", "postmaster@tenant-b.test", BOB_B)
    srv.start()
    try:
        send(srv, "postmaster", "bare, host name local")
        assert subjects(srv, BOB_B) == [b"bare, host name local"]
        assert subjects(srv, PM_A) == []
    finally:
        srv.stop()
