"""Listeners: accept connections, enforce connection caps, run one session task each.

A listener is a set of sockets sharing one handler (``async def
handler(conn)``) and one pair of caps: concurrent connections in all and per
client address (an IPv6 client: per /64, ``policy/clients.py``).  The smtp
listener shared by several processes counts in their shared table
(net/caps.py): the caps hold for all of them together.  A
connection over a cap is answered with the protocol's "busy" line
(``busy_reply``) and closed without starting a session.

Two kinds of listener accept by themselves (net/accept.py) instead of
through ``loop.create_server``:

- one shared by several smtp processes (``shares``): it takes a connection
  only when it is its turn, so the processes hold about as many
  connections each;
- an implicit-TLS one (465, 995): a connection counts against the caps from
  ``accept()`` on, while its handshake runs (at most HANDSHAKE_SECONDS), and
  one over a cap is closed at once, before any handshake, with no busy line
  (it could only be sent in plaintext).  ``create_server`` would hand the
  connection over only after the handshake, so idle TCP connections that
  never start one would each hold a descriptor, uncounted, for the whole
  handshake deadline.
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
from typing import Any

from postoffice import logfmt, metrics
from postoffice.config.settings import ListenAddress
from postoffice.net.accept import BACKLOG, Acceptor, AcceptShares, bind
from postoffice.net.connection import Connection
from postoffice.policy.clients import client_key

log = logging.getLogger("postoffice.net")

HANDSHAKE_SECONDS = 30.0  # an implicit-TLS client that has not finished its handshake is dropped

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
    # process accepts from the same queue), or bound before root was dropped
    # (app.py, [run]), instead of binding ``addresses``.
    inherited: list[socket.socket] = field(default_factory=list)
    # Set when several processes share the listening sockets: take turns.
    shares: AcceptShares | None = None
    servers: list[asyncio.Server] = field(default_factory=list)
    acceptor: Acceptor | None = None  # when accepting by itself (``shares``, implicit TLS)
    tasks: dict[asyncio.Task[None], Connection] = field(default_factory=dict)
    # This process's connections by policy.clients.client_key (the caps:
    # ``_take``; with ``shares``, all smtp processes' counts).
    per_ip: Counter[str] = field(default_factory=Counter)
    bound: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._adopting: set[asyncio.Task[None]] = set()
        # Accepted and counted in ``per_ip``, session not started yet (the TLS
        # handshake runs, or connection_made is still to come).
        self._unstarted = 0

    def socket_fds(self) -> list[int]:
        """The listening sockets' descriptors, for processes that share them."""
        if self.acceptor is not None:
            return [sock.fileno() for sock in self.acceptor.sockets]
        return [sock.fileno() for server in self.servers for sock in server.sockets]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.shares is not None or self.tls is not None:
            self._start_accepting(loop)
            return
        for sock in self.inherited:
            self.servers.append(await loop.create_server(self._make_connection, sock=sock))
            self._record_bound(sock)
        for addr in () if self.inherited else self.addresses:
            server = await loop.create_server(
                self._make_connection,
                host=addr.host,
                port=addr.port,
                reuse_address=True,
                backlog=BACKLOG,
            )
            self.servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.bound.append((str(name[0]), int(name[1])))

    def _record_bound(self, sock: socket.socket) -> None:
        name = sock.getsockname()
        self.bound.append((str(name[0]), int(name[1])))

    # --- accepting by itself (``shares``, implicit TLS) -------------------------------
    def _start_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        sockets = self.inherited or [s for a in self.addresses for s in bind(a)]
        for sock in sockets:
            self._record_bound(sock)
        self.acceptor = Acceptor(self.name, sockets, self._accepted, self.shares)
        self.acceptor.start(loop)

    def _accepted(self, client: socket.socket, address: Any) -> None:
        ip = client_key(str(address[0]))  # an IPv6 client counts by its /64
        if not self._take(ip):
            self._refuse_socket(client, ip)
            return
        # Counted from here on: the handshake (or a plaintext connection's
        # connection_made) runs on the count; the connection's made() starts
        # the session, _adoption_failed gives the count back.
        self._unstarted += 1
        if self.shares is not None:
            self.shares.opened()
        task = self._loop.create_task(self._adopt(client, ip, str(address[0])))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def _refuse_socket(self, client: socket.socket, ip: str) -> None:
        """Over a cap at accept: a plaintext client gets the busy line, a TLS
        one nothing (no handshake is started for it); closed at once either way."""
        log.warning("%s: refused %s: too many connections", self.name, ip)
        metrics.connection_refused(self.name)
        with contextlib.suppress(OSError):
            if self.tls is None:
                client.setblocking(False)
                client.send(self.busy_reply)  # one short line: fits an empty socket buffer
        client.close()

    async def _adopt(self, client: socket.socket, ip: str, peer: str) -> None:
        conn = self._make_connection(reserved_ip=ip)
        try:
            client.setblocking(False)
            await self._loop.connect_accepted_socket(
                lambda: conn,
                client,
                ssl=self.tls,
                ssl_handshake_timeout=HANDSHAKE_SECONDS if self.tls else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The session never began, so it logs nothing: this is its record.
            log.info(
                "%s session client=%s tls=%s end=%s reason=%s",
                self.name,
                peer,
                "implicit" if self.tls else "no",
                logfmt.field("TLS handshake failed" if self.tls else "dropped"),
                logfmt.field(str(exc) or type(exc).__name__),
            )
            self._adoption_failed(client, conn, ip)
        except BaseException:  # cancelled while stopping
            self._adoption_failed(client, conn, ip)
            raise

    def _adoption_failed(self, client: socket.socket, conn: Connection, ip: str) -> None:
        client.close()
        if conn.transport is None:  # never made: no session owns the count
            self._unstarted -= 1
            self._forget(ip)
            self._released()

    def _forget(self, ip: str) -> None:
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        if self.shares is not None:
            self.shares.caps.release(ip)

    def _released(self) -> None:
        if self.shares is not None:
            self.shares.closed()

    # --- sessions ---------------------------------------------------------------------
    def _make_connection(self, reserved_ip: str | None = None) -> Connection:
        """``reserved_ip``: the connection was counted at accept (net/accept.py, Acceptor)."""
        conn = Connection()
        original = conn.connection_made

        def made(transport: asyncio.BaseTransport) -> None:
            original(transport)
            if reserved_ip is None:
                self._admit(conn)
            else:
                self._unstarted -= 1
                self._start_session(conn, reserved_ip)

        conn.connection_made = made  # type: ignore[method-assign]
        return conn

    def _take(self, ip: str) -> bool:
        """Count a new connection from ``ip`` unless it would pass a cap: this
        process's counts, or with ``shares`` those of every smtp process
        together (net/caps.py), so N processes do not hold N times the caps."""
        if self.shares is not None:
            if not self.shares.caps.admit(ip, self.max_connections, self.max_per_ip):
                return False
        elif (
            len(self.tasks) + self._unstarted >= self.max_connections
            or self.per_ip[ip] >= self.max_per_ip
        ):
            return False
        self.per_ip[ip] += 1
        return True

    def _admit(self, conn: Connection) -> None:
        ip = client_key(conn.peer[0])  # an IPv6 client counts by its /64
        if not self._take(ip):
            log.warning("%s: refused %s: too many connections", self.name, conn.peer[0])
            metrics.connection_refused(self.name)
            conn.write(self.busy_reply)
            if conn.transport:
                conn.transport.close()
            self._released()
            return
        self._start_session(conn, ip)

    def _start_session(self, conn: Connection, ip: str) -> None:
        conn.listener = self.name
        metrics.connection(self.name)
        if conn.tls:  # implicit TLS: the handshake is done (STARTTLS counts in Connection)
            metrics.tls_established(self.name, conn.tls_version())
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
            self._forget(ip)
            self._released()
            task = asyncio.current_task()
            if task is not None:
                self.tasks.pop(task, None)

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()
        if self.acceptor is not None:
            self.acceptor.stop()

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
        for task in self._adopting:
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
