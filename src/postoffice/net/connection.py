"""A byte connection for protocol sessions: asyncio Protocol in, awaitable reads out.

Sessions (SMTP, POP3) drive a sans-I/O core; they need four things from the
socket: "give me whatever bytes have arrived" with a timeout, buffered
writes with back-pressure and a timeout, an in-place TLS upgrade that
provably drops any plaintext that arrived before it (RFC 3207 §4.2, RFC 2595
§4), and close.  asyncio's StreamReader keeps its own buffer across
``start_tls``, which is exactly the buffer a STARTTLS injection hides in, so
this small Protocol is used instead: every byte it received before the
upgrade is discarded by ``start_tls`` itself, and every byte decrypted after
the handshake is kept (a TLS 1.3 client may send its first command in the
same flight as its Finished, RFC 8446 §2).

IMAP's COMPRESS=DEFLATE (RFC 4978) lives here too, as ``start_deflate``:
from then on ``read`` inflates and ``write`` deflates (``net/compress.py``),
and the session goes on reading and writing plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import cast

from postoffice import metrics
from postoffice.net.compress import Deflate

READ_LIMIT = 256 * 1024  # pause the socket when this much is buffered unread
# A peer that takes none of our pending output for this long is gone (or
# hostile: pipelining and never reading); sessions set their protocol's own
# idle timeout in ``Connection.write_timeout``, this is the bound for one that
# does not.
WRITE_TIMEOUT = 300.0
# ``writelines`` under TLS: chunks are joined up to this size per write (a
# few full 16 KiB TLS records, small enough to stay out of mmap'd memory).
TLS_PIECE = 64 * 1024


class WriteTimeout(TimeoutError):
    """The peer took none of our pending output within ``write_timeout``."""


class ConnectionClosed(Exception):
    """The peer went away (or we closed): nothing more will arrive."""


class ShuttingDown(Exception):
    """The server is stopping and the session was waiting at a safe point."""


class Connection(asyncio.Protocol):
    """One client connection.  Create with ``loop.create_server(Connection)``
    style factories, then ``await connection.read()`` from the session task."""

    def __init__(self) -> None:
        self._loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        # Received and not yet read: the chunks as the transport gave them
        # (read() hands a single chunk on without copying it).
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.tls = False
        self.listener = "none"  # which listener accepted it (its name), for the metrics
        self._shutdown = False
        # Read timeouts: one timer per connection, re-armed only when it fires
        # early, instead of a new timer (and asyncio.timeout's bookkeeping) per
        # read.  ``_deadline`` is when the read in progress gives up.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The session's fast path: input that arrives while the session waits
        # in read() is offered to ``on_data`` first; True means it was consumed
        # and answered there, in this callback, and read() goes on waiting
        # (no task wake-up per command).  See Pop3Session.answer_at_once, the
        # one user, and its module docstring for what that buys.
        self.on_data: Callable[[bytes], bool] | None = None
        # Seconds ``drain`` waits for the peer to take our writes; then the
        # connection is aborted and WriteTimeout raised.
        self.write_timeout = WRITE_TIMEOUT
        self.deflate: Deflate | None = None  # COMPRESS=DEFLATE is on (start_deflate)

    # --- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.local = (str(sock[0]), int(sock[1]))
        self.tls = transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        if (
            self.on_data is not None
            and self._waiter is not None
            and not self._chunks
            and not self._shutdown
            and self.on_data(data)
        ):
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_LIMIT and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is over its high-water mark: ``drain`` waits."""
        return self._write_paused

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter and not self._waiter.done():
            self._waiter.set_result(None)

    # --- for sessions ---------------------------------------------------------
    def request_shutdown(self) -> None:
        """Wake a session waiting in an interruptible read (server stopping)."""
        self._shutdown = True
        self._wake()

    async def read(self, timeout: float | None, *, interruptible: bool = False) -> bytes:
        """Everything received so far (at least one byte); raise ConnectionClosed
        at EOF and TimeoutError after ``timeout`` seconds of silence.

        ``interruptible``: the session is at a safe point (no transaction open),
        so a server shutdown raises ShuttingDown instead of waiting for input.

        Compressed: the plaintext, at most ``compress.INFLATE_CHUNK`` octets
        (raise ``compress.InflateError`` if the stream is invalid).
        """
        if self.deflate is not None:
            return await self._read_inflated(self.deflate, timeout, interruptible)
        return await self._read_raw(timeout, interruptible)

    async def _read_inflated(
        self, deflate: Deflate, timeout: float | None, interruptible: bool
    ) -> bytes:
        # What an earlier chunk still holds first (and before EOF is seen);
        # new input is only taken once zlib has consumed the old, so memory
        # holds at most one received chunk and INFLATE_CHUNK of plaintext.
        while True:
            raw = b"" if deflate.pending else await self._read_raw(timeout, interruptible)
            data = deflate.inflate(raw)
            if data:
                return data

    async def _read_raw(self, timeout: float | None, interruptible: bool) -> bytes:
        if not self._chunks:
            await self._wait_for_data(timeout, interruptible)
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self._read_paused and self.transport:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def _wait_for_data(self, timeout: float | None, interruptible: bool) -> None:
        loop = self._loop
        deadline = None if timeout is None else loop.time() + timeout
        while not self._chunks:
            if self._eof:
                raise ConnectionClosed
            if interruptible and self._shutdown:
                raise ShuttingDown
            if deadline is not None:
                if loop.time() >= deadline:
                    raise TimeoutError
                self._deadline = deadline
                if self._timer is None or self._timer_at > deadline:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = loop.call_at(deadline, self._on_timer)
                    self._timer_at = deadline
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                if self._deadline is not None:
                    deadline = self._deadline  # moved meanwhile (move_read_deadline)
                self._deadline = None

    def move_read_deadline(self, deadline: float) -> None:
        """The read in progress gives up at ``deadline`` (loop time) instead:
        ``on_data`` consumed input meanwhile, so the peer was not silent."""
        if self._deadline is not None:
            self._deadline = deadline

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # no read waiting: the next one arms a timer again
        if self._loop.time() >= deadline:
            self._wake()  # the reader sees the deadline passed and raises TimeoutError
        else:  # armed for an earlier read that has since ended
            # At least 1 ms: the loop's timers may fire up to a millisecond early.
            delay = max(0.001, deadline - self._loop.time())
            self._timer = self._loop.call_later(delay, self._on_timer)
            self._timer_at = deadline

    def time(self) -> float:
        """The event loop's clock (cheaper than asyncio.get_running_loop().time())."""
        return self._loop.time()

    def write(self, data: bytes) -> None:
        if self.transport and not self.transport.is_closing():
            if self.deflate is not None:
                data = self.deflate.compress(data)
            self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        """Write ``chunks`` in order, copied as little as the transport
        allows: plain, the transport takes the list (uvloop sends it with
        one writev, no join: an IMAP FETCH of message bodies writes megabytes
        at a time); under TLS they are joined in pieces of ``TLS_PIECE``
        (each write is encrypted on its own: tiny chunks would each become a
        TLS record, one huge one a huge encrypted copy); compressed, joined
        for the compressor."""
        if not chunks or not self.transport or self.transport.is_closing():
            return
        if self.deflate is not None:
            self.transport.write(self.deflate.compress(b"".join(chunks)))
        elif not self.tls:
            self.transport.writelines(chunks)
        else:
            piece: list[bytes] = []
            size = 0
            for chunk in chunks:
                piece.append(chunk)
                size += len(chunk)
                if size >= TLS_PIECE:
                    self.transport.write(b"".join(piece))
                    piece, size = [], 0
            if piece:
                self.transport.write(b"".join(piece))

    def start_deflate(self, received: bytes = b"") -> None:
        """COMPRESS=DEFLATE (RFC 4978 §3) from now on, both ways: call it right
        after writing the OK.  ``received``: octets the session read after
        the COMPRESS command and did not parse (a client that pipelined its
        next command); they are compressed, so they are inflated first, before
        what is still unread here."""
        if self.deflate is not None:
            raise RuntimeError("compression is already on")
        self.deflate = Deflate()
        if received:
            self._chunks.insert(0, received)
            self._buffered += len(received)
        # The fast path would be offered compressed bytes: only read() inflates.
        self.on_data = None

    async def drain(self) -> None:
        """Wait until the kernel has taken our writes (flow control), at most
        ``write_timeout`` seconds: a client that pipelines commands and never
        reads the replies must not hold its session (and its slot) for ever.
        Then the connection is aborted (a close would wait on the same full
        buffer) and WriteTimeout raised."""
        if self._write_paused and self.transport and not self.transport.is_closing():
            waiter = self._drain_waiter = self._loop.create_future()
            timer = self._loop.call_later(self.write_timeout, self._write_timed_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._drain_waiter = None

    def _write_timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():  # else the peer caught up just in time
            waiter.set_exception(WriteTimeout())
            self.abort()

    async def start_tls(self, context: ssl.SSLContext, timeout: float) -> None:
        """Upgrade to TLS as the server.  Plaintext received before this call is
        discarded, never processed as if it came over TLS (RFC 3207 §4.2,
        RFC 2595 §4).

        Everything that reaches ``data_received`` from here on came through
        the TLS layer: ``loop.start_tls`` hands the socket to its TLS protocol
        before it reads again, so a plaintext byte sent after the command can
        only break the handshake.  What the client sent in the same flight as
        its Finished (TLS 1.3 clients such as msmtp and curl send their next
        command at once) is decrypted right after the handshake, on asyncio
        even before this method returns, and is kept for the next read.
        """
        assert self.transport is not None
        # TLS under an established DEFLATE stream cannot be (RFC 4978 §3:
        # COMPRESS comes after authentication, STARTTLS before).
        assert self.deflate is None, "STARTTLS after COMPRESS"
        self.discard_received()
        async with asyncio.timeout(timeout):
            new = await self._loop.start_tls(self.transport, self, context, server_side=True)
        if new is None:
            raise ConnectionClosed
        self.transport = new
        self.tls = True
        metrics.tls_established(self.listener, self.tls_version())

    def discard_received(self) -> None:
        """Forget everything received and not yet read (before a TLS upgrade)."""
        self._chunks = []
        self._buffered = 0

    @property
    def unread(self) -> int:
        """Octets received and not yet read."""
        return self._buffered

    def tls_version(self) -> str | None:
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        return cast(ssl.SSLObject, obj).version() if obj else None

    def tls_cipher(self) -> str | None:
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        cipher = cast(ssl.SSLObject, obj).cipher() if obj else None
        return cipher[0] if cipher else None

    async def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drain(), 5)
            self.transport.close()

    def abort(self) -> None:
        if self.transport:
            self.transport.abort()
