"""\\Recent for IMAP4rev1 sessions (RFC 3501 §2.3.2, §6.3.1, §6.3.2, §7.3.2).

A message is recent to exactly one session: the first that selects its
folder (read-write) after it arrived.  That session sees ``* n RECENT``,
``\\Recent`` in FLAGS and finds it with SEARCH RECENT / NEW; every other
session, and the same folder selected again, does not.  EXAMINE looks
without claiming.  IMAP4rev2 (RFC 9051 Appendix E) has no \\Recent: a rev2
session neither shows nor claims it.  Raw IMAPS transcripts over real
sockets; new mail also comes by SMTP.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.imap import ALICE, ALICE_PW, MESSAGE, context, deliver_smtp
from tests.support.imap_wire import WireClient
from tests.support.server import PostofficeServer


@pytest.fixture()
def srv(tmp_path: Path) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path)
    server.add_user(ALICE, ALICE_PW)
    server.start()
    yield server
    server.stop()


def connect(srv: PostofficeServer, *, rev2: bool = False) -> WireClient:
    sock = socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=15)
    client = WireClient(context(srv).wrap_socket(sock, server_hostname="127.0.0.1"))
    assert client.command(f'LOGIN "{ALICE}" "{ALICE_PW}"')[-1].split()[1] == b"OK"
    if rev2:
        assert b"* ENABLED IMAP4rev2\r\n" in client.command("ENABLE IMAP4rev2")
    return client


def recent_of(lines: list[bytes]) -> int | None:
    found = [int(m[1]) for m in (re.match(rb"\* (\d+) RECENT\r\n", x) for x in lines) if m]
    return found[-1] if found else None


def searched(lines: list[bytes]) -> list[int]:
    line = next(x for x in lines if x.startswith(b"* SEARCH"))
    return [int(n) for n in line.split()[2:]]


def flags_by_seq(lines: list[bytes]) -> dict[int, set[str]]:
    out = {}
    for line in lines:
        m = re.match(rb"\* (\d+) FETCH \(.*FLAGS \(([^)]*)\)", line)
        if m:
            out[int(m[1])] = set(m[2].decode().split())
    return out


def fill(srv: PostofficeServer, folder: str, count: int, seen: int = 0) -> None:
    """``count`` messages APPENDed (APPEND claims nothing), the first ``seen`` \\Seen."""
    client = connect(srv)
    try:
        client.command(f"CREATE {folder}")
        for n in range(count):
            flags = "(\\Seen)" if n < seen else "()"
            assert client.command(f"APPEND {folder} {flags}", MESSAGE)[-1].split()[1] == b"OK"
    finally:
        client.close()


def test_the_first_select_claims_recent_and_the_next_sees_none(srv: PostofficeServer) -> None:
    fill(srv, "Box", 3, seen=1)
    first, second = connect(srv), connect(srv)
    try:
        # STATUS counts what no session claimed yet (RFC 3501 §6.3.10).
        status = first.command("STATUS Box (RECENT)")
        assert re.search(rb"\(RECENT 3\)", status[0]), status
        assert recent_of(first.command("SELECT Box")) == 3
        assert recent_of(second.command("SELECT Box")) == 0
        flags = flags_by_seq(first.command("FETCH 1:* FLAGS"))
        assert all("\\Recent" in f for f in flags.values()), flags
        assert not any(
            "\\Recent" in f for f in flags_by_seq(second.command("FETCH 1:* FLAGS")).values()
        )
        assert searched(first.command("SEARCH RECENT")) == [1, 2, 3]
        assert searched(first.command("SEARCH NEW")) == [2, 3]  # RECENT UNSEEN
        assert searched(first.command("SEARCH OLD")) == []
        assert searched(second.command("SEARCH RECENT")) == []
        assert searched(second.command("SEARCH OLD")) == [1, 2, 3]
        assert re.search(rb"\(RECENT 0\)", second.command("STATUS Box (RECENT)")[0])
        # The claim holds for the next session too: recent to one session only.
        third = connect(srv)
        assert recent_of(third.command("SELECT Box")) == 0
        third.close()
    finally:
        first.close()
        second.close()


def test_new_mail_is_recent_to_the_session_that_hears_of_it_first(
    srv: PostofficeServer,
) -> None:
    fill(srv, "Box", 1)
    first, second = connect(srv), connect(srv)
    try:
        assert recent_of(first.command("SELECT Box")) == 1
        assert recent_of(second.command("SELECT Box")) == 0
        adder = connect(srv)
        adder.command("APPEND Box ()", MESSAGE)
        adder.close()
        # RFC 3501 §7.3.2: RECENT comes with the EXISTS, the session's total.
        noop = first.command("NOOP")
        assert b"* 2 EXISTS\r\n" in noop and recent_of(noop) == 2, noop
        noop = second.command("NOOP")
        assert b"* 2 EXISTS\r\n" in noop and recent_of(noop) == 0, noop
        assert "\\Recent" in flags_by_seq(first.command("FETCH 2 FLAGS"))[2]
        # A STORE's untagged FETCH keeps the session's \Recent.
        store = first.command("STORE 2 +FLAGS (\\Flagged)")
        assert {"\\Recent", "\\Flagged"} <= flags_by_seq(store)[2], store
    finally:
        first.close()
        second.close()


def test_inbox_mail_by_smtp_is_recent(srv: PostofficeServer) -> None:
    deliver_smtp(srv, "one")
    client = connect(srv)
    try:
        assert recent_of(client.command("SELECT INBOX")) == 1
        deliver_smtp(srv, "two")
        lines: list[bytes] = []
        for _ in range(50):  # the delivery is on disk; the NOOP after it reports it
            lines = client.command("NOOP")
            if recent_of(lines) is not None:
                break
        assert b"* 2 EXISTS\r\n" in lines and recent_of(lines) == 2, lines
    finally:
        client.close()


def test_examine_looks_without_claiming(srv: PostofficeServer) -> None:
    fill(srv, "Box", 2)
    looker = connect(srv)
    try:
        assert recent_of(looker.command("EXAMINE Box")) == 2
        assert searched(looker.command("SEARCH RECENT")) == [1, 2]
        claimer = connect(srv)
        assert recent_of(claimer.command("SELECT Box")) == 2
        claimer.close()
        assert recent_of(looker.command("EXAMINE Box")) == 0
    finally:
        looker.close()


def test_rev2_neither_shows_nor_claims_recent(srv: PostofficeServer) -> None:
    fill(srv, "Box", 2)
    rev2 = connect(srv, rev2=True)
    try:
        lines = rev2.command("SELECT Box")
        assert recent_of(lines) is None, lines
        flags = flags_by_seq(rev2.command("FETCH 1:* FLAGS"))
        assert flags and not any("\\Recent" in f for f in flags.values())
    finally:
        rev2.close()
    rev1 = connect(srv)
    try:
        assert recent_of(rev1.command("SELECT Box")) == 2
    finally:
        rev1.close()


def test_claims_survive_a_restart(srv: PostofficeServer) -> None:
    fill(srv, "Box", 2)
    client = connect(srv)
    assert recent_of(client.command("SELECT Box")) == 2
    client.close()
    srv.stop()
    srv.start()
    client = connect(srv)
    try:
        assert recent_of(client.command("SELECT Box")) == 0
    finally:
        client.close()


def test_a_client_cannot_set_or_clear_recent(srv: PostofficeServer) -> None:
    fill(srv, "Box", 1)
    client, other = connect(srv), connect(srv)
    try:
        client.command("SELECT Box")
        other.command("SELECT Box")
        # RFC 3501 §2.3.2: \Recent "cannot be altered by the client": it
        # is not stored, and it stays the claiming session's.
        lines = client.command("STORE 1 FLAGS (\\Recent \\Seen)")
        assert lines[-1].split()[1] == b"OK", lines
        assert flags_by_seq(lines)[1] == {"\\Recent", "\\Seen"}, lines
        assert flags_by_seq(client.command("STORE 1 -FLAGS (\\Recent)"))[1] == {
            "\\Recent",
            "\\Seen",
        }
        assert flags_by_seq(other.command("FETCH 1 FLAGS"))[1] == {"\\Seen"}
    finally:
        client.close()
        other.close()
