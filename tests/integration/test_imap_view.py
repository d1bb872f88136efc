"""The selected folder's view, read at first need, and the FETCH structure
cache, seen by clients over real sockets.

SELECT reads only the folder's counters; the messages are read when a
command first needs them.  What changed in between must reach the client
as RFC 9051 §7.5.1 asks: an expunge stays numbered until an EXPUNGE is
sent, a delivery arrives as EXISTS, never during a FETCH.  ENVELOPE and
BODYSTRUCTURE come from the index's cache once computed, across sessions
and restarts.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator

import pytest

from tests.support.imap import ALICE, ALICE_PW, context
from tests.support.imap_wire import WireClient
from tests.support.server import PostofficeServer


def message(n: int) -> bytes:
    return f"From: bob@example.test\r\nSubject: number {n}\r\n\r\nbody {n}\r\n".encode()


@pytest.fixture
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path_factory.mktemp("view"))
    server.add_user(ALICE, ALICE_PW)
    server.start()
    yield server
    server.stop()


def connect(srv: PostofficeServer) -> WireClient:
    sock = socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=15)
    client = WireClient(context(srv).wrap_socket(sock, server_hostname="127.0.0.1"))
    assert client.command(f'LOGIN "{ALICE}" "{ALICE_PW}"')[-1].split()[1] == b"OK"
    return client


def fill(srv: PostofficeServer, count: int) -> None:
    client = connect(srv)
    for n in range(1, count + 1):
        assert client.command("APPEND INBOX ()", message(n))[-1].split()[1] == b"OK"
    client.close()


def fetched(lines: list[bytes]) -> list[tuple[int, int]]:
    """(sequence number, UID) of each FETCH response."""
    return [
        (int(m[1]), int(m[2]))
        for line in lines
        if (m := re.match(rb"\* (\d+) FETCH \(UID (\d+)", line))
    ]


def test_an_expunge_between_select_and_first_use_stays_numbered(srv: PostofficeServer) -> None:
    fill(srv, 3)
    reader, other = connect(srv), connect(srv)
    try:
        assert b"* 3 EXISTS\r\n" in reader.command("SELECT INBOX")
        other.command("SELECT INBOX")
        other.command("STORE 1 +FLAGS.SILENT (\\Deleted)")
        assert b"* 1 EXPUNGE\r\n" in other.command("EXPUNGE")
        # The reader was told 3 messages: UID 2 is still its number 2, and
        # the expunged number 1 gives no data (RFC 9051 §7.5.1: no EXPUNGE
        # during FETCH).
        lines = reader.command("FETCH 1:* (UID)")
        assert fetched(lines) == [(2, 2), (3, 3)]
        assert not any(b"EXPUNGE" in line for line in lines)
        lines = reader.command("SEARCH ALL")
        assert b"* SEARCH 2 3\r\n" in lines
        assert b"* 1 EXPUNGE\r\n" in reader.command("NOOP")
        assert fetched(reader.command("FETCH 1:* (UID)")) == [(1, 2), (2, 3)]
    finally:
        reader.close()
        other.close()


def test_a_delivery_between_select_and_first_use_comes_as_exists(srv: PostofficeServer) -> None:
    fill(srv, 2)
    reader, other = connect(srv), connect(srv)
    try:
        assert b"* 2 EXISTS\r\n" in reader.command("SELECT INBOX")
        assert other.command("APPEND INBOX ()", message(3))[-1].split()[1] == b"OK"
        lines = reader.command("FETCH 1:* (UID)")
        assert fetched(lines) == [(1, 1), (2, 2)]  # as SELECT told, nothing new mid-FETCH
        assert not any(b"EXISTS" in line for line in lines)
        assert b"* 3 EXISTS\r\n" in reader.command("NOOP")
        assert fetched(reader.command("UID FETCH 3 (UID)")) == [(3, 3)]
    finally:
        reader.close()
        other.close()


def test_structures_come_from_the_cache_across_sessions_and_restarts(
    srv: PostofficeServer,
) -> None:
    fill(srv, 2)
    client = connect(srv)
    client.command("SELECT INBOX")
    first = client.command("FETCH 1:2 (ENVELOPE BODYSTRUCTURE RFC822.SIZE)")
    client.close()
    assert b"number 1" in first[0] and b"number 2" in first[1]
    # Maildir files never change; rewrite one behind the server's back to
    # see that the next FETCH of its structure does not read it again.
    (path,) = [p for p in srv.messages(ALICE) if p.read_bytes().find(b"number 1") > 0]
    path.write_bytes(path.read_bytes().replace(b"number 1", b"rewrote 1"))
    srv.stop()
    srv.start()
    client = connect(srv)
    client.command("SELECT INBOX")
    again = client.command("FETCH 1:2 (ENVELOPE BODYSTRUCTURE RFC822.SIZE)")
    header = b"".join(client.command("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    client.close()
    assert again[:2] == first[:2]  # the cached answer, byte for byte
    assert b"rewrote 1" in header  # while the text is read from the file


def test_internaldate_is_the_files_mtime_when_first_asked(srv: PostofficeServer) -> None:
    # A file a delivery agent wrote, named with its size (",S="): the first
    # sync takes the size from the name and reads the date only when asked.
    maildir = srv.maildir(ALICE)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    data = message(1).replace(b"\r\n", b"\n")
    path = maildir / "new" / f"1700000000.M1P1.host,S={len(data)}"
    path.write_bytes(data)
    when = 1_600_000_000  # 13-Sep-2020 12:26:40 +0000
    os.utime(path, (when, when))
    client = connect(srv)
    try:
        client.command("SELECT INBOX")
        assert b"* 1 SEARCH 1\r\n" not in client.command("SEARCH SINCE 1-Jan-2021")
        assert b"* SEARCH 1\r\n" in client.command("SEARCH BEFORE 14-Sep-2020")
        lines = client.command("FETCH 1 (INTERNALDATE RFC822.SIZE)")
        assert b'INTERNALDATE "13-Sep-2020 12:26:40 +0000"' in lines[0]
        assert b"RFC822.SIZE %d" % len(message(1)) in lines[0]
    finally:
        client.close()
    os.utime(path, (when + 86400, when + 86400))  # the index keeps what it read
    srv.stop()
    srv.start()
    client = connect(srv)
    try:
        client.command("SELECT INBOX")
        lines = client.command("FETCH 1 (INTERNALDATE)")
        assert b'INTERNALDATE "13-Sep-2020 12:26:40 +0000"' in lines[0]
    finally:
        client.close()
