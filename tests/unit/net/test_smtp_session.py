"""SmtpSession in the test process over a socket pair (tests/support/inprocess.py).

Real services (Maildirs and their journal, the queue, the accounts), a real
Connection; faults are injected at the storage calls a full or broken disk
would fail (a spill's write, the journal's append, the queue file's write),
so the replies come from the session's real error paths: RFC 5321 §4.1.1.4
(a verdict after the final dot), RFC 3463 (4.3.1 mail system full, 4.3.0
other), RFC 2920 §3.1 (pipelined replies), RFC 3207 §4.2 (STARTTLS).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from postoffice.delivery.queue import writer as queue_writer_module
from postoffice.mail.address import parse_mailbox
from postoffice.net.smtp_session import SmtpMode
from postoffice.protocol.errors import LocalProtocolError
from postoffice.protocol.smtp_server import DataChunk, SmtpServerCore
from postoffice.services import Services
from postoffice.storage import maildir as maildir_module
from postoffice.storage.journal import Journal
from tests.support.helpers import ALICE, ALICE_PW, BOB, until
from tests.support.inprocess import (
    SmtpClientEnd,
    mailbox,
    run,
    running_services,
    smtp_client,
    stored,
)

SPILLED = 300 * 1024  # past maildir.SPILL_THRESHOLD (256 KiB): streamed to tmp/ during DATA
# Three spills: the second waits for the first's write, so a failed write is
# seen mid-DATA (the last one only at commit).
THREE_SPILLS = 800 * 1024


def message(body_size: int = 0, subject: str = "hello") -> bytes:
    """A message in wire form (CRLF, dot-stuffed, final dot) with about
    ``body_size`` octets of body."""
    line = b"x" * 70 + b"\r\n"
    body = line * (body_size // len(line)) if body_size else b"Hi.\r\n"
    return (
        b"Subject: "
        + subject.encode()
        + b"\r\nFrom: <sender@remote.test>\r\n\r\n"
        + body
        + b".\r\n"
    )


async def greeted(client: SmtpClientEnd) -> None:
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250


async def start_data(client: SmtpClientEnd, rcpt: str = ALICE) -> None:
    assert (await client.cmd("MAIL FROM:<sender@remote.test>"))[0] == 250
    assert (await client.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354


async def transaction(
    client: SmtpClientEnd, data: bytes, rcpt: str = ALICE
) -> tuple[int, list[str]]:
    await start_data(client, rcpt)
    await client.send(data)
    return await client.reply()


def no_files_in(services: Services, address: str) -> bool:
    return not stored(services, address, "tmp") and not stored(services, address, "new")


# --- the happy paths ----------------------------------------------------------------------


def test_a_message_for_a_local_user_is_stored_with_its_trace_fields(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            code, lines = await transaction(client, message())
            assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as "), lines
            queue_id = lines[0].rsplit(" ", 1)[1]
            [path] = stored(services, ALICE)
            content = path.read_bytes()
            assert content.startswith(
                b"Return-Path: <sender@remote.test>\nDelivered-To: alice@example.test\nReceived: "
            )
            assert f"id {queue_id}".encode() in content
            assert content.endswith(b"\n\nHi.\n")  # stored with LF line ends
            assert (await client.cmd("QUIT"))[0] == 221
            assert await client.closed()

    run(main())


def test_a_pipelined_transaction_is_answered_in_one_write(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            await client.send(
                b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + message()
            )
            # RFC 2920 §3.1: the replies to one batch go out together, so the
            # client has them all in the first read.
            answer = await asyncio.wait_for(client.reader.read(65536), 10)
            codes = [line[:4] for line in answer.split(b"\r\n") if line]
            assert codes == [b"250 ", b"250 ", b"250 ", b"354 ", b"250 "], answer
            assert len(stored(services, ALICE)) == len(stored(services, BOB)) == 1

    run(main())


# --- clients that go away, stay silent or misbehave --------------------------------------


def test_a_client_dropping_mid_data_leaves_nothing_behind(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            await start_data(client)
            await client.send(message(SPILLED)[: SPILLED - 1000])  # no final dot
            assert await until(lambda: stored(services, ALICE, "tmp")), "never spilled to tmp/"
            client.writer.close()
            await asyncio.wait_for(client.task, 10)
            assert no_files_in(services, ALICE)

    run(main())


def test_an_idle_client_is_cut_off_with_421_4_4_2(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            running_services(tmp_path, limits={"smtp_timeout": 0.2}) as services,
            smtp_client(services) as client,
        ):
            await greeted(client)
            assert await client.reply() == (
                421,
                ["4.4.2 mail.example.test Error: timeout exceeded"],
            )
            assert await client.closed()

    run(main())


def test_a_shutdown_reaches_an_idle_session_as_421_4_3_2(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            client.conn.request_shutdown()
            assert await client.reply() == (421, ["4.3.2 mail.example.test Service shutting down"])
            assert await client.closed()

    run(main())


def test_max_errors_closes_the_session_with_421_4_7_0(tmp_path: Path) -> None:
    async def main() -> None:
        limits = {"max_errors": 3, "soft_errors": 100}
        async with (
            running_services(tmp_path, limits=limits) as services,
            smtp_client(services) as client,
        ):
            await greeted(client)
            await client.send(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n")
            codes = [(await client.reply())[0] for _ in range(4)]
            assert codes == [500, 500, 500, 421]  # NOOP, after the limit, is never answered
            assert await client.closed()

    run(main())


# --- AUTH and STARTTLS ---------------------------------------------------------------------


def test_auth_is_refused_on_the_relay_port_and_in_plaintext(tmp_path: Path) -> None:
    plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()

    async def main() -> None:
        async with running_services(tmp_path) as services:
            async with smtp_client(services, SmtpMode.RELAY_IN) as client:
                await greeted(client)
                assert (await client.cmd(f"AUTH PLAIN {plain}"))[0] == 502
            # From loopback, but allow_plaintext_loopback is off (the default).
            async with smtp_client(services, SmtpMode.SUBMISSION, tcp=True) as client:
                await greeted(client)
                assert client.session.client_ip == "127.0.0.1"
                assert (await client.cmd(f"AUTH PLAIN {plain}"))[0] == 538
                assert (await client.cmd("MAIL FROM:<alice@example.test>"))[0] == 530

    run(main())


def test_starttls_with_a_command_pipelined_behind_it_is_refused_and_closed(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            await client.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n")
            # RFC 3207 §4.2: the plaintext MAIL is never executed, now or inside
            # TLS; the STARTTLS is refused and the session closed.
            code, lines = await client.reply()
            assert (code, lines[0]) == (
                554,
                "5.5.1 Nothing may follow STARTTLS before the handshake",
            )
            assert await client.closed()
            assert client.session.core.tls is False
            assert stored(services, ALICE) == []

    run(main())


def test_starttls_alone_is_answered_and_the_session_restarts_inside_tls(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            assert (await client.cmd("STARTTLS"))[0] == 220
            await client.starttls()
            code, lines = await client.cmd("EHLO client.test")
            assert code == 250 and lines[0] == "mail.example.test greets client.test", lines
            assert "STARTTLS" not in lines
            code, lines = await transaction(client, message())
            assert code == 250, lines
            assert b"with ESMTPS" in stored(services, ALICE)[0].read_bytes()

    run(main())


# --- storage failing -----------------------------------------------------------------------


def failing(number: int) -> Callable[..., None]:
    """A stand-in for a storage call that fails as the kernel would with ``number``."""

    def fail(*_args: object) -> None:
        raise OSError(number, os.strerror(number))

    return fail


@pytest.mark.parametrize("size", [THREE_SPILLS, SPILLED], ids=["mid-data", "seen-at-commit"])
def test_a_full_disk_while_spilling_is_answered_452_after_the_final_dot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            monkeypatch.setattr(maildir_module, "writev_all", failing(errno.ENOSPC))
            # A spill fails while DATA goes on (or, the last one, is waited
            # for at commit); the rest is read and dropped, and the verdict
            # comes after the final dot (RFC 5321 §4.1.1.4).
            code, lines = await transaction(client, message(size))
            assert (code, lines) == (452, ["4.3.1 Insufficient system storage"])
            assert no_files_in(services, ALICE)
            monkeypatch.undo()  # room again: the same session goes on
            assert (await transaction(client, message()))[0] == 250
            assert len(stored(services, ALICE)) == 1

    run(main())


@pytest.mark.parametrize("number", [errno.EDQUOT, errno.ENOSPC])
def test_a_full_disk_at_commit_is_452_and_nothing_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, number: int
) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            # A small message is acknowledged once the journal's append is durable.
            monkeypatch.setattr(Journal, "append", failing(number))
            code, lines = await transaction(client, message())
            assert (code, lines) == (452, ["4.3.1 Insufficient system storage"])
            assert no_files_in(services, ALICE)
            # The whole file system is full, not this mailbox broken: its
            # next message is not held back at RCPT.
            assert services.maildirs.unavailable(parse_mailbox(ALICE)) is None

    run(main())


def test_a_full_disk_at_commit_to_the_queue_is_452(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()

    async def main() -> None:
        auth = {"allow_plaintext_loopback": True}
        async with (
            running_services(tmp_path, auth=auth) as services,
            smtp_client(services, SmtpMode.SUBMISSION, tcp=True) as client,
        ):
            await greeted(client)
            assert (await client.cmd(f"AUTH PLAIN {plain}"))[0] == 235
            monkeypatch.setattr(queue_writer_module, "write_all", failing(errno.EDQUOT))
            await client.send(b"MAIL FROM:<alice@example.test>\r\n")
            assert (await client.reply())[0] == 250
            assert (await client.cmd("RCPT TO:<carol@remote.test>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(message().replace(b"<sender@remote.test>", b"<alice@example.test>"))
            assert await client.reply() == (452, ["4.3.1 Insufficient system storage"])
            queue = services.settings.queue_dir
            assert not [p for p in queue.rglob("*") if p.is_file()], "left in the queue"

    run(main())


@pytest.mark.parametrize("number", [errno.EDQUOT, errno.ENOSPC])
def test_a_full_disk_raised_raw_at_commit_is_452_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, number: int
) -> None:
    """An OSError that reaches the session's commit unwrapped is classified
    like a DeliveryError (storage/errors.py): EDQUOT was once answered 451."""

    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            with monkeypatch.context() as patch:
                patch.setattr(maildir_module.DeliveryWriter, "commit", failing(number))
                code, lines = await transaction(client, message())
            assert (code, lines) == (452, ["4.3.1 Insufficient system storage"])
            assert no_files_in(services, ALICE)
            assert (await transaction(client, message()))[0] == 250

    caplog.set_level(logging.INFO, logger="postoffice")
    run(main())
    (failed,) = [r for r in caplog.records if r.getMessage().startswith("smtp delivery failed")]
    assert failed.exc_info is None  # a full disk is a line, not a traceback


@pytest.mark.parametrize(
    "fault", [OSError(errno.EIO, "Input/output error"), RuntimeError("a bug in storage")]
)
def test_any_other_failure_at_commit_is_451_and_the_session_goes_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: Exception,
) -> None:
    def fail(*_args: object) -> None:
        raise fault

    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            with monkeypatch.context() as patch:
                patch.setattr(Journal, "append", fail)
                code, lines = await transaction(client, message())
            assert (code, lines) == (451, ["4.3.0 Local error in processing"])
            assert no_files_in(services, ALICE)
            assert (await transaction(client, message()))[0] == 250

    caplog.set_level(logging.INFO, logger="postoffice")
    run(main())
    failed = [r for r in caplog.records if r.getMessage().startswith("smtp delivery failed")]
    assert len(failed) == 1
    # A bug is logged with its traceback; an I/O error is a line.
    assert (failed[0].exc_info is not None) == isinstance(fault, RuntimeError)


def test_a_maildir_that_cannot_be_written_gets_451_and_waits(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_services(tmp_path) as services, smtp_client(services) as client:
            await greeted(client)
            box = mailbox(services, BOB)
            box.mkdir(parents=True)
            (box / "tmp").write_bytes(b"")  # a file where the directory should be
            assert await transaction(client, message(), rcpt=BOB) == (
                451,
                ["4.3.0 Local error in processing"],
            )
            assert not stored(services, BOB)
            # The mailbox is known broken for a while: its next message waits
            # at RCPT; other recipients are not held up.
            assert (await client.cmd("MAIL FROM:<sender@remote.test>"))[0] == 250
            assert (await client.cmd(f"RCPT TO:<{BOB}>"))[0] == 450
            assert (await client.cmd(f"RCPT TO:<{ALICE}>"))[0] == 250

    run(main())


def test_a_core_protocol_error_ends_only_that_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A LocalProtocolError (the session drove its core wrongly: a bug) in
    the middle of DATA closes that connection and discards the message; the
    services go on serving."""
    original = SmtpServerCore.next_event
    seen = [0]

    def next_event(core: SmtpServerCore) -> object:
        event = original(core)
        if isinstance(event, DataChunk):
            seen[0] += len(event.data)
            if seen[0] > SPILLED // 2:
                raise LocalProtocolError("driven wrongly (injected)")
        return event

    async def main() -> None:
        async with running_services(tmp_path) as services:
            async with smtp_client(services) as client:
                await greeted(client)
                await start_data(client)
                with monkeypatch.context() as patch:
                    patch.setattr(SmtpServerCore, "next_event", next_event)
                    await client.send(message(SPILLED))
                    assert await client.closed()
                    await asyncio.wait_for(client.task, 10)
                assert seen[0] > SPILLED // 2
                assert no_files_in(services, ALICE)
            async with smtp_client(services) as client:
                await greeted(client)
                assert (await transaction(client, message()))[0] == 250

    caplog.set_level(logging.INFO, logger="postoffice")
    run(main())
    assert any("driven wrongly (injected)" in r.getMessage() for r in caplog.records)
