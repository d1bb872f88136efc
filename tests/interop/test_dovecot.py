"""Dovecot reads postoffice's Maildirs directly, and postoffice reads them after Dovecot.

postoffice promises standard Maildirs with Dovecot-style names (``,S=`` file
size, ``,W=`` size with CRLF line endings) that other tools can serve.  A
real Dovecot, pointed at postoffice's mail tree, must see every message
with the sizes postoffice wrote into the names, and its POP3 must hand out
exactly the bytes postoffice's POP3 hands out; after Dovecot has marked,
deleted and indexed, postoffice must still serve the mailbox correctly.
Outside CI a missing Dovecot skips; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import hashlib
import poplib
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dovecot import DOVEADM, DOVECOT, Dovecot, need
from tests.support.helpers import ALICE, ALICE_PW, BOB, make_server, tls_context
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

MESSAGES = [
    ([ALICE], b"Subject: one\r\n\r\nhello\r\n"),
    ([ALICE], "Subject: two\r\n\r\n.dot start\r\n..two dots\r\ncaf\u00e9\r\n\r\n".encode()),
    ([ALICE], b"Subject: three\r\n\r\n" + (b"s" * 70 + b"\r\n") * 9000),  # streamed
    ([ALICE, BOB], b"Subject: four\r\nTo: alice, bob\r\n\r\nfor both\r\n"),  # hard-linked
]


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[PostofficeServer, Dovecot]]:
    need(DOVECOT)
    need(DOVEADM)
    # Not under pytest's 0700 temp tree: Dovecot's processes run as other users.
    root = Path(tempfile.mkdtemp(prefix="po-dovecot-"))
    root.chmod(0o755)
    srv = make_server(root / "po")
    dovecot = Dovecot(root / "dovecot", srv.data_dir / "mail", {ALICE: ALICE_PW})
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
            for rcpts, message in MESSAGES:
                client.sendmail("sender@remote.test", rcpts, message)
        dovecot.own_mail()
        dovecot.start()
        yield srv, dovecot
    finally:
        dovecot.stop()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def digest(found: list[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """Sorted (size, SHA-256): comparable, and short when a comparison fails."""
    return sorted((size, hashlib.sha256(data).hexdigest()) for size, data in found)


def everything(client: poplib.POP3) -> list[tuple[int, bytes]]:
    """(listed size, message as received) for each message, in server order."""
    _resp, listing, _octets = client.list()
    found = []
    for entry in listing:
        number, size = entry.split()
        _resp, lines, _octets = client.retr(int(number))
        found.append((int(size), b"".join(line + b"\r\n" for line in lines)))
    return found


def dovecot_pop3(dovecot: Dovecot) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", dovecot.port, timeout=30)
    client.user(ALICE)
    client.pass_(ALICE_PW)
    return client


def postoffice_pop3(srv: PostofficeServer) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=30)
    client.stls(tls_context())
    client.user(ALICE)
    client.pass_(ALICE_PW)
    return client


def test_doveadm_sees_every_message_with_the_sizes_in_our_names(
    stack: tuple[PostofficeServer, Dovecot],
) -> None:
    srv, dovecot = stack
    rows = dovecot.doveadm(
        "-f", "tab", "fetch", "-u", ALICE, "guid size.physical size.virtual", "all"
    ).splitlines()
    assert rows[0].split("\t") == ["guid", "size.physical", "size.virtual"]
    by_name = {p.name.split(":2,")[0]: p for p in srv.messages(ALICE)}
    assert len(rows) - 1 == len(by_name) == len(MESSAGES)
    for row in rows[1:]:
        guid, physical, virtual = row.split("\t")
        path = by_name[guid]  # Dovecot's GUID for a Maildir file is its base name
        content = path.read_bytes()
        assert int(physical) == len(content)
        assert int(virtual) == len(content) + content.count(b"\n")
        assert f",S={physical},W={virtual}" in path.name
    count = dovecot.doveadm("search", "-u", ALICE, "all").splitlines()
    assert len(count) == len(MESSAGES)


def test_dovecot_pop3_serves_the_bytes_postoffice_serves(
    stack: tuple[PostofficeServer, Dovecot],
) -> None:
    srv, dovecot = stack
    ours = postoffice_pop3(srv)
    from_postoffice = everything(ours)
    ours.quit()
    theirs = dovecot_pop3(dovecot)
    from_dovecot = everything(theirs)
    theirs.quit()
    assert len(from_dovecot) == len(MESSAGES)
    for size, data in from_dovecot + from_postoffice:
        assert size == len(data)  # LIST is what RETR delivers (RFC 1939 §5)
    assert digest(from_dovecot) == digest(from_postoffice)
    bodies = b"".join(data for _size, data in from_dovecot)
    assert b"\r\n.dot start\r\n..two dots\r\ncaf\xc3\xa9\r\n" in bodies  # unstuffed by poplib


def test_postoffice_after_dovecot_deleted_marked_and_indexed(
    stack: tuple[PostofficeServer, Dovecot],
) -> None:
    srv, dovecot = stack
    theirs = dovecot_pop3(dovecot)
    _resp, lines, _octets = theirs.retr(1)
    gone = b"\r\n".join(lines)
    theirs.dele(1)
    theirs.quit()
    maildir = srv.maildir(ALICE)
    assert (maildir / "dovecot-uidlist").exists()  # Dovecot's own files sit beside ours
    assert any(re.search(r":2,S?$", p.name) for p in (maildir / "cur").iterdir())

    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
        client.sendmail("sender@remote.test", [ALICE], b"Subject: five\r\n\r\nlater\r\n")
    dovecot.own_mail()

    ours = postoffice_pop3(srv)
    from_postoffice = everything(ours)
    ours.quit()
    theirs = dovecot_pop3(dovecot)
    from_dovecot = everything(theirs)
    theirs.quit()
    assert len(from_postoffice) == len(MESSAGES)  # one deleted, one new
    assert digest(from_dovecot) == digest(from_postoffice)
    assert all(gone not in data for _s, data in from_postoffice)
    assert any(b"Subject: five" in data for _s, data in from_postoffice)
    assert "Error" not in dovecot.log()
