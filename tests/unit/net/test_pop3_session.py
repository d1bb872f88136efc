"""The POP3 session: RETR answered in the connection's callback (no socket
needed), and whole sessions over a socket pair."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from postoffice.net.pop3_session import Pop3Session
from postoffice.protocol.pop3 import NEED_DATA, Pop3State, retr_wire_form, wire_size
from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.pop3_mailbox import Pop3Mailbox, ReadAhead
from tests.support.helpers import ALICE, ALICE_PW
from tests.support.inprocess import pop3_client, run, running_services, smtp_client, stored

# --- RETR answered in the connection's callback (Pop3Session.answer_at_once) ----------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.backlog = 0

    def get_write_buffer_size(self) -> int:
        return self.backlog


class FakeConnection:
    tls = False
    peer = ("127.0.0.1", 1)

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.on_data: object = None
        self.deadline: float | None = None

    def time(self) -> float:
        return 1000.0

    def move_read_deadline(self, deadline: float) -> None:
        self.deadline = deadline

    def write(self, data: bytes) -> None:
        self.transport.written.append(data)


@pytest.fixture
def in_transaction(tmp_path: Path) -> Iterator[tuple[Pop3Session, FakeConnection]]:
    """A session in TRANSACTION after RETR 1 of three messages: 2 and 3 are
    read ahead (the window after the first RETR)."""
    ensure_maildir(tmp_path)
    for i in range(1, 4):
        (tmp_path / "new" / f"17000000{i:02d}.m").write_bytes(b"message %d\n" % i)
    limits = SimpleNamespace(pop3_timeout=600.0, max_errors=10)
    services = SimpleNamespace(settings=SimpleNamespace(limits=limits), executor=None)
    conn = FakeConnection()
    session = Pop3Session(services, conn)  # type: ignore[arg-type]
    box = session.mailbox = Pop3Mailbox.open(tmp_path, wire_size)
    session.ahead = ReadAhead(box, None, retr_wire_form)
    session.core.state = Pop3State.TRANSACTION
    first = box.get(1)
    assert first is not None
    asyncio.run(session.ahead.first(1, first))
    yield session, conn
    box.close()


def test_a_lone_retr_of_a_message_read_ahead_is_answered_at_once(
    in_transaction: tuple[Pop3Session, FakeConnection],
) -> None:
    session, conn = in_transaction
    assert conn.on_data == session.answer_at_once
    assert session.answer_at_once(b"RETR 2\r\n")
    assert conn.transport.written == [b"+OK 11 octets\r\nmessage 2\r\n.\r\n"]
    assert conn.deadline == 1000.0 + 600.0  # the idle timer restarted
    assert session.core.next_event() is NEED_DATA  # answered: the core is in step
    assert session.mailbox is not None
    assert [m.retrieved for m in session.mailbox.messages] == [False, True, False]
    assert session.retrieved == 1
    assert session.ahead is not None and session.ahead.take(2) is None  # handed out once


@pytest.mark.parametrize("line", [b"retr 3\r\n", b"RETR 3\n", b"RETR 03\r\n"])
def test_the_core_parses_the_line(
    in_transaction: tuple[Pop3Session, FakeConnection], line: bytes
) -> None:
    """Whatever the core reads as RETR 3 is answered at once, as the
    ordinary way would answer it."""
    session, conn = in_transaction
    assert session.answer_at_once(line)
    assert conn.transport.written == [b"+OK 11 octets\r\nmessage 3\r\n.\r\n"]


@pytest.mark.parametrize(
    "line",
    [
        b"RETR 1\r\n",  # not read ahead: the ordinary way reads it
        b"RETR 2\r\nRETR 3\r\n",  # pipelined
        b"RETR 2",  # no line end yet
        b"RETR 02x\r\n",
        b"RETR \xd9\xa2\r\n",  # a non-ASCII digit
        b"RETR 4\r\n",  # no such message
        b"RETR 1234567890123456789\r\n",
        b"RETR 2 3\r\n",
        b"DELE 2\r\n",
        b"\n",
    ],
)
def test_anything_else_takes_the_ordinary_way_untouched(
    in_transaction: tuple[Pop3Session, FakeConnection], line: bytes
) -> None:
    session, conn = in_transaction
    assert not session.answer_at_once(line)
    assert conn.transport.written == []
    assert not session.core.has_buffered_data
    assert session.core.next_event() is NEED_DATA  # nothing taken
    assert session.ahead is not None
    assert [session.ahead.take(n) for n in (2, 3)] == [b"message 2\r\n.\r\n", b"message 3\r\n.\r\n"]


def test_no_answer_at_once_when_deleted_backlogged_or_outside_transaction(
    in_transaction: tuple[Pop3Session, FakeConnection],
) -> None:
    session, conn = in_transaction
    box = session.mailbox
    assert box is not None
    box.messages[1].deleted = True  # DELE 2: RETR 2 must get -ERR, the ordinary way
    assert not session.answer_at_once(b"RETR 2\r\n")
    conn.transport.backlog = 1  # a client that does not read: the task drains
    assert not session.answer_at_once(b"RETR 3\r\n")
    conn.transport.backlog = 0
    # Replies not yet written come first (the task flushes before it waits
    # for input, so this is a guard, reachable only from inside).
    session._send(b"+OK pending\r\n")
    assert not session.answer_at_once(b"RETR 3\r\n")
    session._out, session._out_size = [], 0
    session.core.state = Pop3State.AUTHORIZATION
    assert not session.answer_at_once(b"RETR 3\r\n")
    assert conn.transport.written == []
    session.core.state = Pop3State.TRANSACTION
    assert session.answer_at_once(b"RETR 3\r\n")


def test_a_message_changed_since_login_is_not_answered_at_once(tmp_path: Path) -> None:
    """Read ahead, but its wire size is not its LIST size any more (the file
    shrank): not answered from what was read; RETR reads it again."""
    ensure_maildir(tmp_path)
    for i in range(1, 3):
        (tmp_path / "new" / f"17000000{i:02d}.m").write_bytes(b"message %d\n" % i)
    limits = SimpleNamespace(pop3_timeout=600.0, max_errors=10)
    services = SimpleNamespace(settings=SimpleNamespace(limits=limits), executor=None)
    conn = FakeConnection()
    session = Pop3Session(services, conn)  # type: ignore[arg-type]
    box = session.mailbox = Pop3Mailbox.open(tmp_path, wire_size)
    try:
        session.ahead = ReadAhead(box, None, retr_wire_form)
        session.core.state = Pop3State.TRANSACTION
        (tmp_path / "new" / "1700000002.m").write_bytes(b"short\n")
        first = box.get(1)
        assert first is not None
        asyncio.run(session.ahead.first(1, first))
        assert not session.answer_at_once(b"RETR 2\r\n")
        assert conn.transport.written == []
    finally:
        box.close()


# --- a whole session over a socket pair (tests/support/inprocess.py) ------------------


def test_a_session_logs_in_retrieves_and_deletes_over_stls(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services:
            async with smtp_client(services) as smtp:
                assert (await smtp.reply())[0] == 220
                await smtp.send(
                    b"HELO client.test\r\nMAIL FROM:<x@remote.test>\r\n"
                    b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
                )
                assert [(await smtp.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
                await smtp.send(
                    b"Subject: s\r\n\r\n..leading dot\r\n.\r\n"
                )  # stored: ".leading dot"
                assert (await smtp.reply())[0] == 250
            async with pop3_client(services) as pop:
                assert (await pop.reply()).startswith("+OK")
                assert (await pop.cmd(f"USER {ALICE}")).startswith("-ERR [AUTH]")  # no TLS yet
                assert await pop.cmd("STLS") == "+OK Begin TLS negotiation"
                await pop.starttls()
                assert (await pop.cmd(f"USER {ALICE}")).startswith("+OK")
                assert (await pop.cmd(f"PASS {ALICE_PW}")).startswith("+OK")
                content = stored(services, ALICE)[0].read_bytes()
                octets = len(content) + content.count(b"\n")  # as CRLF (RFC 1939 §5)
                assert await pop.cmd("STAT") == f"+OK 1 {octets}"
                assert (await pop.cmd("RETR 1")).startswith("+OK")
                body = await pop.multiline()
                assert body.endswith(b"\r\n\r\n..leading dot\r\n")  # stuffed (RFC 1939 §3)
                assert (await pop.cmd("DELE 1")).startswith("+OK")
                assert (await pop.cmd("QUIT")).startswith("+OK")
                assert await pop.closed()
            assert not stored(services, ALICE) and not stored(services, ALICE, "cur")

    run(main())


def test_a_command_pipelined_behind_stls_closes_the_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, pop3_client(services) as pop:
            assert (await pop.reply()).startswith("+OK")
            await pop.send(b"STLS\r\nUSER alice@example.test\r\n")
            assert await pop.reply() == "-ERR Nothing may follow STLS before the handshake"
            assert await pop.closed()  # RFC 2595 §4

    run(main())
