"""TLS on a Connection and a Listener, driven by a client that coalesces records.

A TLS 1.3 client may send its first command in the same write as its
Finished (RFC 8446 §2: the client's application data may follow its
Finished at once); msmtp (GnuTLS) and curl do.  The client here is an
``ssl.SSLObject`` over ``MemoryBIO``s on a real socket, so the test chooses
what goes into each ``send()``: Finished and the command in one.  Python's
own ``SSLSocket`` (smtplib, poplib) never does that, which is why the suite
once missed the loss of that command.  Every test runs on the plain asyncio
loop and on uvloop (the server uses it where installed): the two deliver
the bytes decrypted after the handshake at different moments.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from postoffice.config.settings import ListenAddress
from postoffice.net import listener as listener_module
from postoffice.net.connection import Connection
from postoffice.net.listener import Listener
from postoffice.net.tls import ensure_self_signed, server_context
from tests.support.loops import LOOPS, require_loop


def run_on(loop_name: str, main: Coroutine[Any, Any, None]) -> None:
    try:
        require_loop(loop_name)
    except BaseException:  # skipped: ``main`` never runs
        main.close()
        raise
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = ensure_self_signed(tmp_path_factory.mktemp("tls"), "mail.example.test")
    return server_context(cert, key)


class CoalescingClient:
    """A blocking TLS 1.3 client whose every record goes out when it says so."""

    def __init__(self, sock: socket.socket) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing)

    def handshake_then_send(self, command: bytes) -> None:
        """Handshake, holding back the client's last flight (its Finished);
        then send Finished and ``command`` together in one ``send()``."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed during the handshake") from None
                self.incoming.write(data)
        assert self.tls.version() == "TLSv1.3"
        finished = self.outgoing.read()
        assert finished, "the client's Finished is held back"
        self.tls.write(command)
        self.sock.sendall(finished + self.outgoing.read())  # one write, one segment

    def read_line(self) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            try:
                data += self.tls.read(4096)
                continue
            except ssl.SSLWantReadError:
                pass
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.incoming.write(chunk)
        return data


def client_thread(port: int, plaintext: bytes, command: bytes) -> bytes:
    """Connect, send ``plaintext`` (STARTTLS) and read its reply if any, then
    handshake with ``command`` coalesced onto Finished; the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if plaintext:
            sock.sendall(plaintext)
            assert sock.recv(100) == b"220 go ahead\r\n"
        client = CoalescingClient(sock)
        client.handshake_then_send(command)
        try:
            return client.read_line()
        except TimeoutError:
            return b"(no answer)"


async def echo_after_tls(conn: Connection, tls: ssl.SSLContext | None) -> None:
    """A tiny STARTTLS session: the command, 220, the upgrade, then echo one line."""
    if tls is not None:
        assert await conn.read(5) == b"STARTTLS\r\n"
        conn.write(b"220 go ahead\r\n")
        await conn.drain()
        await conn.start_tls(tls, 5)
    line = b""
    while not line.endswith(b"\n"):
        line += await conn.read(3)
    conn.write(b"got " + line)
    await conn.drain()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_command_in_the_same_write_as_finished_is_answered_after_starttls(
    loop_name: str, server_tls: ssl.SSLContext
) -> None:
    answers: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sessions: list[asyncio.Task[None]] = []

        def factory() -> Connection:
            conn = Connection()
            sessions.append(loop.create_task(echo_after_tls(conn, server_tls)))
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for _ in range(5):  # one lost command is one too many
            answers.append(
                await asyncio.to_thread(client_thread, port, b"STARTTLS\r\n", b"EHLO x\r\n")
            )
        server.close()
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    run_on(loop_name, main())
    assert answers == [b"got EHLO x\r\n"] * 5


@pytest.mark.parametrize("loop_name", LOOPS)
def test_plaintext_sent_before_the_handshake_is_still_discarded(
    loop_name: str, server_tls: ssl.SSLContext
) -> None:
    """The injection defence stays: bytes behind STARTTLS in plaintext are
    dropped, what comes inside TLS (in the Finished's write) is answered."""
    answers: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        conns: list[Connection] = []

        async def session(conn: Connection) -> None:
            assert (await conn.read(5)).startswith(b"STARTTLS\r\n")
            await asyncio.sleep(0.2)  # the injected line is surely buffered by now
            conn.write(b"220 go ahead\r\n")
            await conn.start_tls(server_tls, 5)
            line = b""
            while not line.endswith(b"\n"):
                line += await conn.read(3)
            conn.write(b"got " + line)
            await conn.drain()

        tasks: list[asyncio.Task[None]] = []

        def factory() -> Connection:
            conn = Connection()
            conns.append(conn)
            tasks.append(loop.create_task(session(conn)))
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"STARTTLS\r\n")
                sock.sendall(b"INJECTED\r\n")
                assert sock.recv(100) == b"220 go ahead\r\n"
                tls = CoalescingClient(sock)
                tls.handshake_then_send(b"MINE\r\n")
                return tls.read_line()

        answers.append(await asyncio.to_thread(client))
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    run_on(loop_name, main())
    assert answers == [b"got MINE\r\n"]


def tls_listener(
    handler: Callable[[Connection], Coroutine[Any, Any, None]],
    tls: ssl.SSLContext,
    per_ip: int = 100,
) -> Listener:
    return Listener(
        name="pop3s",
        addresses=(ListenAddress("127.0.0.1", 0),),
        handler=handler,
        busy_reply=b"-ERR busy\r\n",
        max_connections=100,
        max_per_ip=per_ip,
        tls=tls,
    )


@pytest.mark.parametrize("loop_name", LOOPS)
def test_implicit_tls_answers_a_command_coalesced_with_finished(
    loop_name: str, server_tls: ssl.SSLContext
) -> None:
    answers: list[bytes] = []

    async def main() -> None:
        lst = tls_listener(lambda conn: echo_after_tls(conn, None), server_tls)
        await lst.start()
        port = lst.bound[0][1]
        for _ in range(5):
            answers.append(await asyncio.to_thread(client_thread, port, b"", b"CAPA\r\n"))
        lst.stop_accepting()
        await lst.finish(1.0)

    run_on(loop_name, main())
    assert answers == [b"got CAPA\r\n"] * 5


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("loop_name", LOOPS)
def test_tls_listener_counts_a_connection_at_accept_and_drops_it_at_the_deadline(
    loop_name: str, server_tls: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle TCP connections that never start a handshake: the cap holds them
    from accept() on (over it: closed at once, no handshake), and the
    handshake deadline frees every one of them and its count."""
    monkeypatch.setattr(listener_module, "HANDSHAKE_SECONDS", 2.0)
    at_once: list[bool] = []  # closed by the server at once (within 0.3 s each)
    later: list[bool] = []  # ... within 4 s more (the deadline: 2 s)
    counts: list[dict[str, int]] = []

    async def never(conn: Connection) -> None:
        raise AssertionError("no session may start without a handshake")

    async def main() -> None:
        lst = tls_listener(never, server_tls, per_ip=3)
        await lst.start()
        port = lst.bound[0][1]

        def idle_clients() -> None:
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
            try:
                at_once.extend(closed_by_server(s, 0.3) for s in socks)
                later.extend(closed_by_server(s, 4.0) for s in socks)
            finally:
                for s in socks:
                    s.close()

        await asyncio.to_thread(idle_clients)
        counts.append(dict(lst.per_ip))
        lst.stop_accepting()
        await lst.finish(1.0)

    run_on(loop_name, main())
    assert at_once == [False] * 3 + [True] * 5  # three held (the cap), five closed at accept
    assert later == [True] * 8  # the handshake deadline ended the three as well
    assert counts == [{}]  # and released their counts
