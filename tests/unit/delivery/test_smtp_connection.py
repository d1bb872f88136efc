"""The SMTP client over real loopback sockets against scripted servers."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from postoffice.delivery.remote import client_tls_context
from postoffice.delivery.smtp_connection import ClientTimeouts, SmtpClient, SmtpConnectionError
from postoffice.mail.address import Address
from postoffice.net.tls import ensure_self_signed, server_context
from tests.support.peers import ScriptedMta
from tests.support.ports import free_port

ALICE = Address("alice", "example.test")
BOB = Address("bob", "remote.test")
CAROL = Address("carol", "remote.test")
FAST = ClientTimeouts(
    connect=5, greeting=5, command=5, data_init=5, data_block=5, data_end=5, tls=5
)


async def body(*chunks: bytes) -> AsyncGenerator[bytes, None]:
    for c in chunks:
        yield c


@pytest.fixture
def mta() -> Iterator[ScriptedMta]:
    server = ScriptedMta("127.0.0.1", free_port()).start()
    yield server
    server.stop()


async def session(mta: ScriptedMta, tls: bool = False) -> SmtpClient:
    client = await SmtpClient.connect(mta.host, mta.port, FAST)
    assert (await client.greeting()).code == 220
    assert (await client.hello("mail.example.test")).is_positive
    if tls:
        assert (await client.starttls(client_tls_context(), None)).code == 220
        assert (await client.hello("mail.example.test")).is_positive
    return client


def test_transaction_with_per_recipient_replies(mta: ScriptedMta) -> None:
    mta.rcpt_reply = lambda a: {
        "bob@remote.test": "250 2.1.5 Ok",
        "carol@remote.test": "550 5.1.1 no such user",
    }.get(a, "450 4.2.0 later")
    later = Address("later", "remote.test")

    async def go() -> dict[Address, str]:
        client = await session(mta)
        result = await client.send(
            ALICE,
            [BOB, CAROL, later],
            body(b"Subject: x\n\n.hi\n"),
            size=20,
            body_8bit=False,
            smtputf8=False,
        )
        await client.quit()
        assert result.data_sent and result.mail.code == 250
        return {a: r.summary for a, r in result.replies.items()}

    replies = asyncio.run(go())
    assert replies[BOB].startswith("250 2.0.0")
    assert replies[CAROL] == "550 5.1.1 no such user"
    assert replies[later] == "450 4.2.0 later"
    (got,) = mta.received
    assert got.recipients == ["<bob@remote.test>"]
    assert got.data == b"Subject: x\r\n\r\n.hi\r\n"  # dot-stuffed on the wire, CRLF
    assert got.mail_params == "SIZE=20"


def test_no_accepted_recipient_means_no_data(mta: ScriptedMta) -> None:
    mta.rcpt_reply = lambda a: "550 5.1.1 unknown"

    async def go() -> None:
        client = await session(mta)
        result = await client.send(
            ALICE, [BOB], body(b"x\n"), size=None, body_8bit=False, smtputf8=False
        )
        assert not result.data_sent and result.replies[BOB].code == 550
        await client.quit()

    asyncio.run(go())
    assert mta.received == []


def test_without_pipelining_commands_go_one_by_one(mta: ScriptedMta) -> None:
    mta.extensions = ("8BITMIME",)

    async def go() -> None:
        client = await session(mta)
        result = await client.send(
            None, [BOB], body("caf\u00e9\n".encode()), size=None, body_8bit=True, smtputf8=False
        )
        assert result.data_sent
        await client.quit()

    asyncio.run(go())
    assert mta.received[0].sender == "<>" and mta.received[0].mail_params == "BODY=8BITMIME"


def test_helo_fallback_for_old_servers(mta: ScriptedMta) -> None:
    mta.esmtp = False

    async def go() -> None:
        client = await SmtpClient.connect(mta.host, mta.port, FAST)
        await client.greeting()
        assert (await client.hello("mail.example.test")).code == 250
        assert not client.esmtp and client.extensions == {}
        await client.quit()

    asyncio.run(go())
    assert mta.commands[:2] == ["EHLO mail.example.test", "HELO mail.example.test"]


def test_starttls_then_fresh_ehlo(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path, "mx.remote.test")
    mta = ScriptedMta("127.0.0.1", free_port(), tls=server_context(cert, key)).start()
    try:

        async def go() -> None:
            client = await session(mta, tls=True)
            assert client.tls and "TLS" in client.tls_info()
            assert "STARTTLS" not in client.extensions
            await client.send(
                ALICE, [BOB], body(b"\nsecret\n"), size=None, body_8bit=False, smtputf8=False
            )
            await client.quit()

        asyncio.run(go())
        assert mta.received[0].tls
    finally:
        mta.stop()


async def serve_raw(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    test: Callable[[int], Awaitable[None]],
) -> None:
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await test(port)
    finally:
        server.close()
        await asyncio.sleep(0.05)  # let both ends' transports finish closing


def test_pipelining_really_sends_the_group_at_once() -> None:
    # This server answers nothing until MAIL, RCPT, RCPT and DATA have all
    # arrived: a client that waited for each reply would time out.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipe.test\r\n")
        await reader.readline()
        writer.write(b"250-pipe.test\r\n250 PIPELINING\r\n")
        lines = [await reader.readline() for _ in range(4)]
        assert lines[-1] == b"DATA\r\n"
        writer.write(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        while (await reader.readline()) != b".\r\n":
            pass
        writer.write(b"250 queued\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")
        await writer.drain()
        writer.close()

    async def test(port: int) -> None:
        client = await SmtpClient.connect("127.0.0.1", port, FAST)
        await client.greeting()
        await client.hello("mail.example.test")
        result = await client.send(
            ALICE, [BOB, CAROL], body(b"hi\n"), size=None, body_8bit=False, smtputf8=False
        )
        assert [r.code for r in result.replies.values()] == [250, 250]
        await client.quit()

    asyncio.run(serve_raw(handler, test))


def test_silent_server_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # says nothing; returns when the client gives up

    async def test(port: int) -> None:
        quick = ClientTimeouts(connect=2, greeting=0.3)
        client = await SmtpClient.connect("127.0.0.1", port, quick)
        with pytest.raises(SmtpConnectionError, match="timed out"):
            await client.greeting()
        client.abort()

    asyncio.run(serve_raw(handler, test))


def test_refused_connection() -> None:
    async def go() -> None:
        with pytest.raises(SmtpConnectionError):
            await SmtpClient.connect("127.0.0.1", free_port(), FAST)

    asyncio.run(go())


def test_data_pipelined_after_starttls_220_is_refused() -> None:
    # RFC 3207 §4.2: anything after "220 Ready" in the same burst is an
    # injection attempt; the client must not carry it into the TLS session.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 evil.test\r\n")
        await reader.readline()
        writer.write(b"250-evil.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 go ahead\r\n250 injected\r\n")
        await writer.drain()
        await reader.read()

    async def test(port: int) -> None:
        client = await SmtpClient.connect("127.0.0.1", port, FAST)
        await client.greeting()
        await client.hello("mail.example.test")
        with pytest.raises(SmtpConnectionError, match="after 220"):
            await client.starttls(ssl.create_default_context(), None)
        client.abort()

    asyncio.run(serve_raw(handler, test))


def test_garbage_reply_is_a_connection_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def test(port: int) -> None:
        client = await SmtpClient.connect("127.0.0.1", port, FAST)
        with pytest.raises(SmtpConnectionError, match="protocol error"):
            await client.greeting()
        client.abort()

    asyncio.run(serve_raw(handler, test))


@pytest.mark.parametrize("pipelining", [True, False])
def test_bdat_when_the_peer_offers_chunking(mta: ScriptedMta, pipelining: bool) -> None:
    mta.extensions = ("CHUNKING", "8BITMIME", *(("PIPELINING",) if pipelining else ()))

    async def go() -> None:
        client = await session(mta)
        result = await client.send(
            ALICE,
            [BOB],
            body(b"Subject: x\n\n.hi\r", b"\nsecond block\n", b"no final newline"),
            size=None,
            body_8bit=True,
            smtputf8=False,
        )
        assert result.data_sent and result.replies[BOB].summary.startswith("250 2.0.0 Ok: queued")
        await client.quit()

    asyncio.run(go())
    (got,) = mta.received
    # No dot-stuffing, CRLF line ends (a CR LF split between blocks stays one),
    # and the last line ended: RFC 3030 §2 counts octets, RFC 5322 wants CRLF.
    assert got.data == b"Subject: x\r\n\r\n.hi\r\nsecond block\r\nno final newline\r\n"
    assert got.mail_params == "BODY=8BITMIME"
    bdat = [c for c in mta.commands if c.startswith("BDAT")]
    assert bdat[-1].endswith(" LAST") and len(bdat) == 3
    assert "DATA" not in mta.commands


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_chunk_decides_the_message(mta: ScriptedMta, pipelining: bool) -> None:
    mta.extensions = ("CHUNKING", *(("PIPELINING",) if pipelining else ()))
    mta.chunk_reply = lambda n: "552 5.3.4 Message too big" if n == 0 else "250 2.0.0 Ok"

    async def go() -> None:
        client = await session(mta)
        result = await client.send(
            ALICE, [BOB], body(b"a\n", b"b\n", b"c\n"), size=None, body_8bit=False, smtputf8=False
        )
        assert result.replies[BOB].summary == "552 5.3.4 Message too big"
        # Pipelined, the rest went out and was answered: the session is in step.
        assert result.data_sent is pipelining
        await client.quit()

    asyncio.run(go())
    assert mta.received == []
    if not pipelining:  # RFC 3030 §2: no more chunks after a refusal
        assert [c for c in mta.commands if c.startswith("BDAT")] == ["BDAT 3"]


def test_bdat_for_nobody_is_not_sent(mta: ScriptedMta) -> None:
    mta.extensions = ("CHUNKING", "PIPELINING")
    mta.rcpt_reply = lambda a: "550 5.1.1 unknown"

    async def go() -> None:
        client = await session(mta)
        result = await client.send(
            ALICE, [BOB], body(b"x\n"), size=None, body_8bit=False, smtputf8=False
        )
        assert not result.data_sent and result.replies[BOB].code == 550
        await client.quit()

    asyncio.run(go())
    assert not [c for c in mta.commands if c.startswith("BDAT")]
