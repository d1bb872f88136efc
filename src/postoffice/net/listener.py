"""Listeners: accept connections, enforce connection caps, run one session task each.

A listener is a set of sockets sharing one handler (``async def
handler(conn)``) and one pair of caps: concurrent connections in all and per
client address (an IPv6 client: per /64, ``policy/clients.py``).  A
connection over a cap is answered with the protocol's "busy" line
(``busy_reply``) and closed without starting a session.

Two kinds of listener accept by themselves instead of through
``loop.create_server``:

- one shared by several smtp processes (``shares``, see workers.py): it takes
  a connection only when it is its turn, so the processes hold about as many
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
import errno
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postoffice import logfmt
from postoffice.config.settings import ListenAddress
from postoffice.net.connection import Connection
from postoffice.policy.clients import client_key

if TYPE_CHECKING:
    from postoffice.workers import AcceptShares

log = logging.getLogger("postoffice.net")

BACKLOG = 1024
DEFER_SECONDS = 0.002  # not our turn to accept: look again this much later
MAX_DEFER_SECONDS = 0.05  # ... but accept anyway once a client waited this long
ACCEPT_ERROR_PAUSE = 0.1  # after EMFILE and the like: no busy loop on accept()
HANDSHAKE_SECONDS = 30.0  # an implicit-TLS client that has not finished its handshake is dropped
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

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
    # Set when several processes share the listening sockets: take turns.
    shares: AcceptShares | None = None
    servers: list[asyncio.Server] = field(default_factory=list)
    accept_sockets: list[socket.socket] = field(default_factory=list)  # accepting by itself
    tasks: dict[asyncio.Task[None], Connection] = field(default_factory=dict)
    per_ip: Counter[str] = field(default_factory=Counter)  # by policy.clients.client_key
    bound: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._resume_handles: dict[int, asyncio.TimerHandle] = {}
        self._deferring_since: float | None = None
        self._last_deferral = 0.0
        self._adopting: set[asyncio.Task[None]] = set()
        self._accepting = False
        # Accepted and counted in ``per_ip``, session not started yet (the TLS
        # handshake runs, or connection_made is still to come).
        self._unstarted = 0

    def socket_fds(self) -> list[int]:
        """The listening sockets' descriptors, for processes that share them."""
        if self.accept_sockets:
            return [sock.fileno() for sock in self.accept_sockets]
        return [sock.fileno() for server in self.servers for sock in server.sockets]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.shares is not None or self.tls is not None:
            self._start_accepting(loop)
            return
        for sock in self.inherited:
            self.servers.append(await loop.create_server(self._make_connection, sock=sock))
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

    # --- accepting by itself (``shares``, implicit TLS) -------------------------------
    def _start_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        sockets = self.inherited or [s for a in self.addresses for s in _bind(a)]
        for sock in sockets:
            sock.setblocking(False)
            self.accept_sockets.append(sock)
            if not self.inherited:
                name = sock.getsockname()
                self.bound.append((str(name[0]), int(name[1])))
            loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        self._accepting = True
        if self.shares is not None:
            self.shares.accepting(True)

    def _pause(self, sock: socket.socket, delay: float) -> None:
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._resume_handles[fd] = self._loop.call_later(delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._resume_handles.pop(sock.fileno(), None)
        if self._accepting:
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)

    def _on_acceptable(self, sock: socket.socket) -> None:
        shares = self.shares
        if shares is not None and not shares.my_turn():
            now = self._loop.time()
            if self._deferring_since is None or now - self._last_deferral > 4 * DEFER_SECONDS:
                self._deferring_since = now  # a new wait (the last one ended)
            self._last_deferral = now
            if now - self._deferring_since < MAX_DEFER_SECONDS:
                self._pause(sock, DEFER_SECONDS)
                return
        try:
            client, address = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return  # another process took it, or the client gave up meanwhile
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                return  # a network error passed on by accept(2): the next one may be fine
            log.error("%s: cannot accept: %s", self.name, exc)
            self._pause(sock, ACCEPT_ERROR_PAUSE)  # no busy loop while out of descriptors
            return
        self._deferring_since = None
        ip = client_key(str(address[0]))  # an IPv6 client counts by its /64
        if self._over_cap(ip):
            self._refuse_socket(client, ip)
            return
        # Counted from here on: the handshake (or a plaintext connection's
        # connection_made) runs on the count; the connection's made() starts
        # the session, _adoption_failed gives the count back.
        self.per_ip[ip] += 1
        self._unstarted += 1
        if shares is not None:
            shares.opened()
        task = self._loop.create_task(self._adopt(client, ip, str(address[0])))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def _refuse_socket(self, client: socket.socket, ip: str) -> None:
        """Over a cap at accept: a plaintext client gets the busy line, a TLS
        one nothing (no handshake is started for it); closed at once either way."""
        log.warning("%s: refused %s: too many connections", self.name, ip)
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

    def _released(self) -> None:
        if self.shares is not None:
            self.shares.closed()

    def _stop_accepting_by_itself(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        for handle in self._resume_handles.values():
            handle.cancel()
        self._resume_handles.clear()
        for sock in self.accept_sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if self.shares is not None:
            self.shares.accepting(False)

    # --- sessions ---------------------------------------------------------------------
    def _make_connection(self, reserved_ip: str | None = None) -> Connection:
        """``reserved_ip``: the connection was counted at accept (see _on_acceptable)."""
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

    def _over_cap(self, ip: str) -> bool:
        held = len(self.tasks) + self._unstarted
        return held >= self.max_connections or self.per_ip[ip] >= self.max_per_ip

    def _admit(self, conn: Connection) -> None:
        ip = client_key(conn.peer[0])  # an IPv6 client counts by its /64
        if self._over_cap(ip):
            log.warning("%s: refused %s: too many connections", self.name, conn.peer[0])
            conn.write(self.busy_reply)
            if conn.transport:
                conn.transport.close()
            self._released()
            return
        self.per_ip[ip] += 1
        self._start_session(conn, ip)

    def _start_session(self, conn: Connection, ip: str) -> None:
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
        self._stop_accepting_by_itself()

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


def _bind(address: ListenAddress) -> list[socket.socket]:
    """Listening sockets for ``address`` (every address its host resolves to),
    bound as ``loop.create_server`` would bind them."""
    infos = socket.getaddrinfo(
        address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
