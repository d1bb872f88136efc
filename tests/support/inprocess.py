"""Protocol sessions in the test process, over a real socket pair.

The integration tests run the server as a subprocess; these run one
``SmtpSession`` or ``Pop3Session`` in the test's own event loop, with the
real services the composition root builds (``app.build_services``: the
accounts database, Maildirs with their journal, the outbound queue, the
authenticator) and a real ``Connection`` on one end of a socket pair.  The
test is the client on the other end.  That is fast (no process, no port),
and it reaches what a subprocess hides: storage failing mid-DATA or at
commit, the session's own state, ``conn.request_shutdown()``.

    async with running_services(tmp_path) as services:
        async with smtp_client(services) as client:
            assert (await client.cmd("EHLO client.test"))[0] == 250

``tcp=True`` gives a loopback TCP pair (the session sees 127.0.0.1) where
the client address matters; the default socket pair (AF_UNIX) has no
address at all, which the server treats as a non-loopback, non-IP peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

from postoffice.app import build_services
from postoffice.config.settings import Settings, load_settings
from postoffice.mail.address import parse_mailbox
from postoffice.net.connection import Connection
from postoffice.net.pop3_session import Pop3Session
from postoffice.net.smtp_session import SmtpMode, SmtpSession
from postoffice.policy.auth import PasswordHasher
from postoffice.services import Services
from tests.support.helpers import ALICE, ALICE_PW, BOB, BOB_PW
from tests.support.ports import free_port
from tests.support.server import cached_tls_dir, write_config

T = TypeVar("T")

HOSTNAME = "mail.example.test"
# Every await on the other end is bounded: a session that never answers
# fails the test instead of hanging it.
REPLY_TIMEOUT = 10.0

_hashes: dict[str, str] = {}  # password -> argon2id hash: hashed once per test run


def run(main: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test's coroutine in a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(main, timeout)

    return asyncio.run(bounded())


def inprocess_settings(root: Path, **sections: dict[str, Any]) -> Settings:
    """Settings as the server would load them from a config file: domain
    example.test, hostname mail.example.test, the test run's TLS pair, no
    listeners, and [relay] dns_servers at an unused loopback port (a lookup
    nobody expected fails fast and stays on loopback); ``sections``
    override or add tables, e.g. ``limits={"smtp_timeout": 0.2}``."""
    data_dir = root / "data"
    tls_dir = data_dir / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    for name in ("cert.pem", "key.pem"):
        shutil.copyfile(cached_tls_dir() / name, tls_dir / name)
    dns_port = free_port(kind=socket.SOCK_DGRAM)
    merged: dict[str, dict[str, Any]] = {
        "listen": {name: [] for name in ("smtp", "submission", "submissions", "pop3", "pop3s")},
        "relay": {"dns_servers": [f"127.0.0.1:{dns_port}"]},
    }
    for name, table in sections.items():
        merged.setdefault(name, {}).update(table)
    config = root / "postoffice.toml"
    write_config(
        config,
        {"hostname": HOSTNAME, "data_dir": str(data_dir), "domains": ["example.test"]},
        merged,
    )
    return load_settings(config)


def add_user(services: Services, address: str, password: str) -> None:
    if password not in _hashes:
        _hashes[password] = PasswordHasher().hash(password)
    services.accounts.add_user(parse_mailbox(address), _hashes[password])


def mailbox(services: Services, address: str) -> Path:
    """The Maildir of ``address``."""
    return services.maildirs.path_for(parse_mailbox(address))


def stored(services: Services, address: str, sub: str = "new") -> list[Path]:
    """The files in one folder (new, cur, tmp) of ``address``'s Maildir."""
    folder = mailbox(services, address) / sub
    return sorted(folder.iterdir()) if folder.is_dir() else []


@contextlib.asynccontextmanager
async def running_services(root: Path, **sections: dict[str, Any]) -> AsyncIterator[Services]:
    """``app.build_services`` for ``inprocess_settings(root, **sections)``,
    with alice@ and bob@example.test, the journal recovered as the server
    does before it listens; everything stopped again afterwards."""
    services = build_services(inprocess_settings(root, **sections))
    try:
        add_user(services, ALICE, ALICE_PW)
        add_user(services, BOB, BOB_PW)
        services.maildirs.recover()
        yield services
        await services.maildirs.drain()
    finally:
        if services.inbound_checks is not None:
            services.inbound_checks.close()
        services.executor.shutdown(wait=True)
        services.authenticator.close()
        services.maildirs.close()
        services.accounts.close()


def _pair(tcp: bool) -> tuple[socket.socket, socket.socket]:
    """(server end, client end)."""
    if not tcp:
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=REPLY_TIMEOUT)
        server, _addr = listener.accept()
    return server, client


class ClientEnd:
    """The test's end of the socket pair, and a handle on the server's side."""

    def __init__(
        self,
        services: Services,
        session: Any,
        conn: Connection,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.services = services
        self.session = session  # the SmtpSession or Pop3Session under test
        self.conn = conn  # its Connection
        self.task = task  # the session, run as the listener runs it
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        """One line from the server (b"" at EOF)."""
        return await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)

    async def closed(self) -> bool:
        """True if the server closes the connection (after anything still unread)."""
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(self.reader.read(65536), REPLY_TIMEOUT):
                pass
        return True

    async def starttls(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await asyncio.wait_for(
            self.writer.start_tls(context, server_hostname=HOSTNAME), REPLY_TIMEOUT
        )


class SmtpClientEnd(ClientEnd):
    session: SmtpSession

    async def reply(self) -> tuple[int, list[str]]:
        """One (multi-line) reply: its code and its texts."""
        lines: list[str] = []
        while True:
            raw = await self.line()
            if not raw:
                raise ConnectionError(f"closed by the server after {lines}")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def cmd(self, line: str) -> tuple[int, list[str]]:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()


class Pop3ClientEnd(ClientEnd):
    session: Pop3Session

    async def reply(self) -> str:
        """One status line (``+OK ...`` or ``-ERR ...``)."""
        raw = await self.line()
        if not raw:
            raise ConnectionError("closed by the server")
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    async def cmd(self, line: str) -> str:
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def multiline(self) -> bytes:
        """The body of a multi-line answer, as sent (dot-stuffed), without its final dot."""
        body = bytearray()
        while (raw := await self.line()) != b".\r\n":
            if not raw:
                raise ConnectionError("closed by the server inside a multi-line answer")
            body += raw
        return bytes(body)


C = TypeVar("C", bound=ClientEnd)


class _Session(Protocol):
    async def run(self) -> None: ...


@contextlib.asynccontextmanager
async def _session(
    services: Services,
    make: Callable[[Connection], _Session],
    end: type[C],
    tcp: bool,
) -> AsyncIterator[C]:
    server_sock, client_sock = _pair(tcp)
    loop = asyncio.get_running_loop()
    _transport, conn = await loop.connect_accepted_socket(Connection, server_sock)
    session = make(conn)

    async def serve() -> None:  # as net/listener.py runs a session
        try:
            await session.run()
        finally:
            await conn.close()

    task = loop.create_task(serve())
    reader, writer = await asyncio.open_connection(sock=client_sock)
    client = end(services, session, conn, task, reader, writer)
    try:
        yield client
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), REPLY_TIMEOUT)
        try:
            await asyncio.wait_for(asyncio.shield(task), REPLY_TIMEOUT)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise AssertionError("the session did not end when its client went away") from None


def smtp_client(
    services: Services, mode: SmtpMode = SmtpMode.RELAY_IN, *, tcp: bool = False
) -> contextlib.AbstractAsyncContextManager[SmtpClientEnd]:
    """An ``SmtpSession`` in ``mode`` with a client connected; the greeting is unread."""
    return _session(services, lambda c: SmtpSession(services, c, mode), SmtpClientEnd, tcp)


def pop3_client(
    services: Services, *, tcp: bool = False
) -> contextlib.AbstractAsyncContextManager[Pop3ClientEnd]:
    """A ``Pop3Session`` with a client connected; the greeting is unread."""
    return _session(services, lambda c: Pop3Session(services, c), Pop3ClientEnd, tcp)
