"""IMAP4rev1 (RFC 3501) and IMAP4rev2 (RFC 9051) sessions on one server.

A client that never sends ENABLE IMAP4rev2 gets RFC 3501 answers; one that
does gets RFC 9051's (RFC 9051 Appendix E lists the changes).  Raw IMAPS
transcripts: imaplib hides the untagged responses that differ.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from tests.support.imap import ALICE, ALICE_PW, MESSAGE, context
from tests.support.imap_wire import WireClient
from tests.support.server import PostofficeServer

UNSEEN_SECOND = b"From: a@example.test\r\nSubject: second\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path_factory.mktemp("rev1rev2"))
    server.add_user(ALICE, ALICE_PW)
    server.start()
    client = connect(server, rev2=False)
    client.command("CREATE Modes")
    client.command("APPEND Modes (\\Seen)", MESSAGE)
    client.command("APPEND Modes ()", UNSEEN_SECOND)
    client.command("CREATE Entw&APw-rfe")
    client.close()
    yield server
    server.stop()


def connect(srv: PostofficeServer, *, rev2: bool) -> WireClient:
    sock = socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=15)
    client = WireClient(context(srv).wrap_socket(sock, server_hostname="127.0.0.1"))
    assert client.command(f'LOGIN "{ALICE}" "{ALICE_PW}"')[-1].split()[1] == b"OK"
    if rev2:
        assert b"* ENABLED IMAP4rev2\r\n" in client.command("ENABLE IMAP4rev2")
    return client


@pytest.fixture(params=[False, True], ids=["rev1", "rev2"])
def session(
    request: pytest.FixtureRequest, srv: PostofficeServer
) -> Iterator[tuple[WireClient, bool]]:
    client = connect(srv, rev2=request.param)
    yield client, request.param
    client.close()


def test_select_recent_and_unseen_only_for_rev1(session: tuple[WireClient, bool]) -> None:
    client, rev2 = session
    lines = b"".join(client.command("SELECT Modes"))
    # RFC 3501 §6.3.1: RECENT and OK [UNSEEN n] are required; RFC 9051
    # Appendix E: both removed from SELECT.
    assert (re.search(rb"\* \d+ RECENT\r\n", lines) is not None) is not rev2
    assert (re.search(rb"\* OK \[UNSEEN 2\]", lines) is not None) is not rev2
    assert b"* 2 EXISTS\r\n" in lines


def test_search_answers_search_in_rev1_and_esearch_in_rev2(
    session: tuple[WireClient, bool],
) -> None:
    client, rev2 = session
    client.command("EXAMINE Modes")
    lines = client.command("SEARCH UNSEEN")
    # RFC 9051 §7.3.4 (ESEARCH replaces SEARCH); RFC 3501 §7.2.5.
    if rev2:
        assert re.match(rb'\* ESEARCH \(TAG "s\d+"\) ALL 2\r\n', lines[0]), lines
    else:
        assert lines[0] == b"* SEARCH 2\r\n"


def test_mailbox_names_in_modified_utf7_for_rev1_and_utf8_for_rev2(
    session: tuple[WireClient, bool],
) -> None:
    client, rev2 = session
    lines = b"".join(client.command('LIST "" "Entw*"'))
    # RFC 3501 §5.1.3 (modified UTF-7) vs RFC 9051 §5.1 (UTF-8).
    name = "Entwürfe".encode() if rev2 else b"Entw&APw-rfe"
    assert name in lines and (b"&APw-" in lines) is not rev2
    status = b"".join(
        client.command("STATUS " + ('"Entwürfe"' if rev2 else "Entw&APw-rfe") + " (MESSAGES)")
    )
    assert b"* STATUS" in status and name in status


def test_status_recent_is_answered_for_rev1(srv: PostofficeServer) -> None:
    # RFC 3501 §6.3.10 STATUS RECENT (its values: tests/integration/test_imap_recent.py).
    client = connect(srv, rev2=False)
    try:
        lines = client.command("STATUS Modes (MESSAGES RECENT)")
        assert re.search(rb'\* STATUS "?Modes"? \(MESSAGES 2 RECENT [02]\)', lines[0]), lines
    finally:
        client.close()
