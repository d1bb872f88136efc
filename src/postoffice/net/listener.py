"""Listeners: accept connections, enforce connection caps, run one session task each.

A listener is a set of sockets sharing one handler (``async def
handler(conn)``) and one pair of caps: concurrent connections in all and per
client address.  A connection over a cap is answered with the protocol's
"busy" line (``busy_reply``) and closed without starting a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from postoffice.config.settings import ListenAddress
from postoffice.net.connection import Connection

log = logging.getLogger("postoffice.net")

Handler = Callable[[Connection], Awaitable[None]]


@dataclass
class Listener:
    name: str  # "smtp", "pop3s", ...
    addresses: tuple[ListenAddress, ...]
    handler: Handler
    busy_reply: bytes  # sent to a connection over a cap, e.g. b"421 4.7.0 ...\r\n"
    max_connections: int
    max_per_ip: int
    tls: ssl.SSLContext | None = None  # implicit TLS (submissions, pop3s)
    # Listening sockets inherited from the server process (an extra smtp
    # process accepts from the same queue) instead of binding ``addresses``.
    inherited: list[socket.socket] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)
    tasks: dict[asyncio.Task[None], Connection] = field(default_factory=dict)
    per_ip: Counter[str] = field(default_factory=Counter)
    bound: list[tuple[str, int]] = field(default_factory=list)

    def socket_fds(self) -> list[int]:
        """The listening sockets' descriptors, for processes that share them."""
        return [sock.fileno() for server in self.servers for sock in server.sockets]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handshake = 30 if self.tls else None
        for sock in self.inherited:
            self.servers.append(
                await loop.create_server(
                    self._make_connection, sock=sock, ssl=self.tls, ssl_handshake_timeout=handshake
                )
            )
        for addr in () if self.inherited else self.addresses:
            server = await loop.create_server(
                self._make_connection,
                host=addr.host,
                port=addr.port,
                ssl=self.tls,
                reuse_address=True,
                backlog=1024,
                ssl_handshake_timeout=handshake,
            )
            self.servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.bound.append((str(name[0]), int(name[1])))

    def _make_connection(self) -> Connection:
        conn = Connection()
        original = conn.connection_made

        def made(transport: asyncio.BaseTransport) -> None:
            original(transport)
            self._admit(conn)

        conn.connection_made = made  # type: ignore[method-assign]
        return conn

    def _admit(self, conn: Connection) -> None:
        ip = conn.peer[0]
        if len(self.tasks) >= self.max_connections or self.per_ip[ip] >= self.max_per_ip:
            log.warning("%s: refused %s: too many connections", self.name, ip)
            conn.write(self.busy_reply)
            if conn.transport:
                conn.transport.close()
            return
        self.per_ip[ip] += 1
        task = asyncio.get_running_loop().create_task(self._run(conn, ip))
        self.tasks[task] = conn

    async def _run(self, conn: Connection, ip: str) -> None:
        try:
            await self.handler(conn)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: session with %s failed", self.name, ip)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            task = asyncio.current_task()
            if task is not None:
                self.tasks.pop(task, None)

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def finish(self, grace: float) -> None:
        """Let sessions end on their own for ``grace`` seconds, then cancel them."""
        for conn in self.tasks.values():
            conn.request_shutdown()
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
