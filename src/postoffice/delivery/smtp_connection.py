"""An asyncio SMTP client for relaying: one connection, any number of replies.

It drives the sans-I/O client core (``protocol/smtp_client.py``: replies,
commands) and the one dot-stuffer (``protocol/dotstuff.py``: the body) over
a ``ClientConnection`` (our ``net.connection.Connection`` with a client-side
TLS upgrade, so plaintext buffered before STARTTLS is dropped, RFC 3207
§4.2).  Supported:
EHLO with HELO fallback, STARTTLS, PIPELINING (RFC 2920), SIZE, 8BITMIME,
SMTPUTF8, and a body streamed from the queue file in chunks: with BDAT when
the peer offers CHUNKING (RFC 3030), else DATA.  Every wait
has the RFC 5321 §4.5.3.2 timeout for its stage.

aiosmtplib was the other candidate; it takes the whole message as one
``bytes`` and never pipelines, and the queue wants neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from postoffice.mail.address import Address
from postoffice.net.connection import Connection, ConnectionClosed
from postoffice.protocol.dotstuff import DotStuffer
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn
from postoffice.protocol.errors import RemoteProtocolError
from postoffice.protocol.smtp_client import (
    ReplyParser,
    command,
    mail_command,
    parse_ehlo,
    rcpt_command,
)
from postoffice.protocol.smtp_reply import Reply

CLOSE_WAIT = 2.0  # seconds to wait for a closed connection to be torn down


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Seconds to wait at each stage; defaults are RFC 5321 §4.5.3.2's minimums."""

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1 initial 220 message: 5 minutes
    command: float = 300.0  # §4.5.3.2.2/3 MAIL and RCPT: 5 minutes (EHLO alike)
    data_init: float = 120.0  # §4.5.3.2.4 DATA initiation: 2 minutes
    data_block: float = 180.0  # §4.5.3.2.5 each data block sent: 3 minutes
    data_end: float = 600.0  # §4.5.3.2.6 reply to the final dot: 10 minutes
    tls: float = 60.0  # the TLS handshake after 220 to STARTTLS


class SmtpConnectionError(Exception):
    """The connection failed (refused, lost, timed out, or the peer spoke
    nonsense).  ``after_data`` is True when the final dot had been sent:
    the peer may have taken the message (RFC 5321 §6.1's duplicate case)."""

    def __init__(self, message: str, *, after_data: bool = False) -> None:
        super().__init__(message)
        self.after_data = after_data


class ClientConnection(Connection):
    """``Connection`` for the client side of a connection."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: asyncio.Future[None] = self._loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)

    def quiet(self) -> bool:
        """Nothing received and unread, and no EOF."""
        return not self.unread and not self._eof

    async def start_client_tls(
        self, context: ssl.SSLContext, server_hostname: str | None, timeout: float
    ) -> None:
        assert self.transport is not None
        self.discard_received()  # plaintext sent before the upgrade is never read
        async with asyncio.timeout(timeout):
            new = await self._loop.start_tls(
                self.transport, self, context, server_side=False, server_hostname=server_hostname
            )
        if new is None:
            raise ConnectionClosed
        self.transport = new
        self.discard_received()
        self.tls = True


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """Per recipient, the reply that decided its fate, in RCPT order."""

    replies: dict[Address, Reply]
    mail: Reply  # the reply to MAIL FROM
    data_sent: bool  # the body went out and the final reply came back


class SmtpClient:
    """One SMTP client connection.  Create with ``await SmtpClient.connect``."""

    def __init__(self, conn: ClientConnection, timeouts: ClientTimeouts) -> None:
        self._conn = conn
        self._timeouts = timeouts
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.replies_read = 0  # a reused connection that fails before a reply was stale
        self.verified = ""  # how the peer's certificate was authenticated ("" = it was not)

    @classmethod
    async def connect(cls, ip: str, port: int, timeouts: ClientTimeouts) -> SmtpClient:
        """Open a TCP connection; raise SmtpConnectionError."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.connect):
                _transport, conn = await loop.create_connection(ClientConnection, ip, port)
        except TimeoutError:
            raise SmtpConnectionError("connect timed out") from None
        except OSError as exc:
            raise SmtpConnectionError(exc.strerror or str(exc)) from None
        return cls(conn, timeouts)

    @property
    def tls(self) -> bool:
        return self._conn.tls

    @property
    def usable(self) -> bool:
        """Open, and nothing unread from the peer (an idle server may have
        sent 421 before hanging up)."""
        transport = self._conn.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self._conn.lost.done()
            and not self._replies
            and not self._parser.pending
            and self._conn.quiet()
        )

    @property
    def local_ip(self) -> str:
        """Our end's address (a TLS report's sending-mta-ip, RFC 8460 §4.4)."""
        return self._address("sockname")

    @property
    def peer_ip(self) -> str:
        return self._address("peername")

    def _address(self, which: str) -> str:
        transport = self._conn.transport
        name = transport.get_extra_info(which) if transport is not None else None
        return str(name[0]) if name else ""

    def tls_info(self) -> str:
        version, cipher = self._conn.tls_version(), self._conn.tls_cipher()
        if not version:
            return ""
        return f"{version} {cipher}" + (f", verified by {self.verified}" if self.verified else "")

    def peer_chain(self) -> list[bytes]:
        """The certificates the peer sent (DER, its own first), unverified.
        Python < 3.13 gives only the peer's own certificate."""
        transport = self._conn.transport
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        if obj is None:
            return []
        full = getattr(obj, "get_unverified_chain", None)  # Python 3.13+: DER, as sent
        if full is not None:
            return [c for c in full() or [] if isinstance(c, bytes)]
        leaf = obj.getpeercert(binary_form=True)
        return [leaf] if leaf else []

    # --- low level -------------------------------------------------------------------
    async def _reply(self, timeout: float, *, after_data: bool = False) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(100_000):  # each pass reads at least one byte; bounded anyway
            if self._replies:
                self.replies_read += 1
                return self._replies.popleft()
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                data = await self._conn.read(remaining)
                self._replies.extend(self._parser.feed(data))
            except TimeoutError:
                raise SmtpConnectionError(
                    f"timed out after {timeout:.0f}s waiting for a reply", after_data=after_data
                ) from None
            except ConnectionClosed:
                raise SmtpConnectionError(
                    "connection closed by the peer", after_data=after_data
                ) from None
            except RemoteProtocolError as exc:
                raise SmtpConnectionError(f"protocol error: {exc}", after_data=after_data) from None
        raise SmtpConnectionError("reply never completed")

    async def _send(self, data: bytes, timeout: float) -> None:
        self._conn.write(data)
        if self._conn.write_paused:  # only then is there anything to wait for
            try:
                async with asyncio.timeout(timeout):
                    await self._conn.drain()
            except TimeoutError:
                raise SmtpConnectionError(f"timed out after {timeout:.0f}s sending") from None
        if self._conn.transport is None or self._conn.transport.is_closing():
            raise SmtpConnectionError("connection lost while sending")

    # --- the conversation ------------------------------------------------------------
    async def greeting(self) -> Reply:
        return await self._reply(self._timeouts.greeting)

    async def hello(self, name: str) -> Reply:
        """EHLO, or HELO if the peer does not know EHLO (RFC 5321 §4.1.4)."""
        await self._send(command(f"EHLO {name}"), self._timeouts.command)
        reply = await self._reply(self._timeouts.command)
        if reply.is_positive:
            self.esmtp = True
            self.extensions = parse_ehlo(reply)
            return reply
        if reply.code not in (500, 502):
            return reply
        self.esmtp = False
        self.extensions = {}
        await self._send(command(f"HELO {name}"), self._timeouts.command)
        return await self._reply(self._timeouts.command)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """Send STARTTLS; on 220 upgrade the connection (raise SmtpConnectionError
        if the handshake fails).  The caller must EHLO again (RFC 3207 §4.2)."""
        await self._send(b"STARTTLS\r\n", self._timeouts.command)
        reply = await self._reply(self._timeouts.command)
        if reply.code != 220:
            return reply
        if self._replies or self._parser.pending:
            # Replies pipelined after the 220 can only be an injection (RFC 3207 §4.2).
            raise SmtpConnectionError("peer sent data after 220 to STARTTLS")
        try:
            await self._conn.start_client_tls(context, server_hostname, self._timeouts.tls)
        except (ssl.SSLError, OSError, ConnectionClosed, TimeoutError) as exc:
            raise SmtpConnectionError(f"TLS handshake failed: {exc}") from None
        self.extensions = {}
        return reply

    async def send(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        body: AsyncGenerator[bytes, None],
        *,
        size: int | None,
        body_8bit: bool,
        smtputf8: bool,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> TransactionResult:
        """One mail transaction (RFC 5321 §3.3) for ``recipients``.  The DSN
        parameters go out only when the peer offers DSN (RFC 3461 §5.2)."""
        if "DSN" not in self.extensions:
            dsn, rcpt_dsn = None, None
        mail = mail_command(sender, size=size, body_8bit=body_8bit, smtputf8=smtputf8, dsn=dsn)
        rcpts = [rcpt_command(r, (rcpt_dsn or {}).get(r)) for r in recipients]
        t = self._timeouts
        if "CHUNKING" in self.extensions:
            return await self._send_chunked(mail, recipients, rcpts, body)
        if "PIPELINING" in self.extensions:
            # RFC 2920 §3.1: MAIL, every RCPT and DATA in one write; DATA ends the group.
            await self._send(mail + b"".join(rcpts) + b"DATA\r\n", t.command)
            mail_reply = await self._reply(t.command)
            rcpt_replies = [await self._reply(t.command) for _ in rcpts]
            data_reply = await self._reply(t.data_init)
        else:
            await self._send(mail, t.command)
            mail_reply = await self._reply(t.command)
            if not mail_reply.is_positive:
                return TransactionResult(dict.fromkeys(recipients, mail_reply), mail_reply, False)
            rcpt_replies = []
            for line in rcpts:
                await self._send(line, t.command)
                rcpt_replies.append(await self._reply(t.command))
            if not any(r.is_positive for r in rcpt_replies):
                await self._reset()
                return TransactionResult(
                    dict(zip(recipients, rcpt_replies, strict=True)), mail_reply, False
                )
            await self._send(b"DATA\r\n", t.command)
            data_reply = await self._reply(t.data_init)
        if not mail_reply.is_positive:
            rcpt_replies = [mail_reply] * len(recipients)
        replies = dict(zip(recipients, rcpt_replies, strict=True))
        accepted = [r for r, reply in replies.items() if reply.is_positive]
        if data_reply.code != 354:
            for r in accepted:
                replies[r] = data_reply if not data_reply.is_positive else _unexpected(data_reply)
            return TransactionResult(replies, mail_reply, False)
        if not accepted:
            # RFC 2920 §3.1: DATA was accepted although no RCPT was; send an
            # empty message's end so the peer drops the transaction.
            await self._send(b".\r\n", t.data_block)
            await self._reply(t.data_end)
            return TransactionResult(replies, mail_reply, False)
        encoder = DotStuffer()
        pending = b""  # each block goes out once the next is known: the last with the dot
        async with contextlib.aclosing(body) as chunks:
            async for chunk in chunks:
                if pending:
                    await self._send(pending, t.data_block)
                pending = encoder.feed(chunk)
        await self._send(pending + encoder.finish(), t.data_block)
        final = await self._reply(t.data_end, after_data=True)
        for r in accepted:
            replies[r] = final
        return TransactionResult(replies, mail_reply, True)

    async def _send_chunked(
        self,
        mail: bytes,
        recipients: Sequence[Address],
        rcpts: list[bytes],
        body: AsyncGenerator[bytes, None],
    ) -> TransactionResult:
        """The transaction with BDAT (RFC 3030): each block of the queue file
        goes out as one chunk, CRLF lines, no dot-stuffing; the last with LAST.

        The envelope's replies come first (no chunk is sent for nobody).
        With PIPELINING the chunks are pipelined too (RFC 3030 §4.2) and
        their replies read at the end; the first refusal decides."""
        t = self._timeouts
        pipelining = "PIPELINING" in self.extensions
        if pipelining:
            await self._send(mail + b"".join(rcpts), t.command)
            mail_reply = await self._reply(t.command)
            rcpt_replies = [await self._reply(t.command) for _ in rcpts]
        else:
            await self._send(mail, t.command)
            mail_reply = await self._reply(t.command)
            rcpt_replies = []
            if mail_reply.is_positive:
                for line in rcpts:
                    await self._send(line, t.command)
                    rcpt_replies.append(await self._reply(t.command))
        if not mail_reply.is_positive:
            return TransactionResult(dict.fromkeys(recipients, mail_reply), mail_reply, False)
        replies = dict(zip(recipients, rcpt_replies, strict=True))
        accepted = [r for r, reply in replies.items() if reply.is_positive]
        if not accepted:
            await self._reset()
            return TransactionResult(replies, mail_reply, False)
        encoder = DotStuffer(dots=False)
        unanswered = 0
        refusal: Reply | None = None
        pending = b""  # each block goes out once the next is known: the last with LAST
        async with contextlib.aclosing(body) as chunks:
            async for chunk in chunks:
                data = encoder.feed(chunk)
                if not data:
                    continue
                if pending:
                    await self._send(b"BDAT %d\r\n" % len(pending) + pending, t.data_block)
                    unanswered += 1
                    if not pipelining:
                        reply = await self._reply(t.data_block)
                        unanswered -= 1
                        if not reply.is_positive:
                            refusal = reply  # RFC 3030 §2: no more chunks of it
                            break
                pending = data
        final: Reply | None = refusal
        if refusal is None:
            pending += encoder.finish()
            await self._send(b"BDAT %d LAST\r\n" % len(pending) + pending, t.data_block)
            for left in range(unanswered, -1, -1):
                reply = await self._reply(t.data_end if not left else t.data_block, after_data=True)
                if final is None and (not reply.is_positive or not left):
                    final = reply  # the first refusal, else the answer to LAST
        assert final is not None
        for r in accepted:
            replies[r] = final
        return TransactionResult(replies, mail_reply, refusal is None)

    async def _reset(self) -> None:
        with contextlib.suppress(SmtpConnectionError):
            await self._send(b"RSET\r\n", self._timeouts.command)
            await self._reply(self._timeouts.command)

    async def quit(self) -> None:
        """QUIT politely (RFC 5321 §4.1.1.10), never waiting long, then close."""
        with contextlib.suppress(SmtpConnectionError, ValueError):
            await self._send(b"QUIT\r\n", 5.0)
            await self._reply(5.0)
        await self.close()

    async def close(self) -> None:
        """Close, and wait (briefly) until the socket is really gone; a TLS
        connection first exchanges close_notify."""
        await self._conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._conn.lost), CLOSE_WAIT)

    def abort(self) -> None:
        self._conn.abort()


def _unexpected(reply: Reply) -> Reply:
    """A 2xx/3xx where 354 belonged: the peer is confused; try again later."""
    return Reply(451, f"unexpected reply to DATA: {reply.summary}", "4.5.0")
