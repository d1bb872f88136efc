"""Accepting by hand, and smtp processes taking turns at one listening socket.

Most listeners accept through ``loop.create_server``.  Two kinds accept by
themselves (``Acceptor``: ``add_reader`` on the listening socket, one
``accept()`` per wake-up, the connection handed to the listener):

- an implicit-TLS one (465, 995), so that a connection counts against the
  caps from ``accept()`` on, while its handshake runs (net/listener.py);
- one shared by several smtp processes (``[limits] smtp_processes``): the
  server's extra processes (workers.py) inherit its listening sockets and
  accept from the same queue.

Taking turns.  Left to the kernel, whichever process wakes first takes a
burst of new connections (20 sessions arriving at once were seen split
0/20, and the idle core then stays idle); SO_REUSEPORT's hash would split
them at random (four sessions: 3/1 or worse most of the time).  So the
processes publish how many connections each holds (``AcceptShares``, one
slot per process in a small shared file, ``data_dir/smtp-shares``) and a
process accepts only while it holds no more than the least loaded of the
others, give or take a slack (``AcceptShares.my_turn``).  Otherwise it steps
back for ``DEFER_SECONDS`` and looks again, and after ``MAX_DEFER_SECONDS``
it accepts anyway: a stuck peer must not stall new clients.  When this came
in, 20 smtp-source sessions split 10/10 in every run, where the kernel had
split them 0/20 to 8/12 (1821 msg/s at 0/20, 3230 at 8/12).

The connection caps are not the turns' business: the processes count them
together in a table of their own (net/caps.py, ``AcceptShares.caps``), exact
where these counts are advisory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postoffice.config.settings import ListenAddress
from postoffice.net.caps import SharedCaps

log = logging.getLogger("postoffice.net")

BACKLOG = 1024
DEFER_SECONDS = 0.002  # not our turn to accept: look again this much later
MAX_DEFER_SECONDS = 0.05  # ... but accept anyway once a client waited this long
ACCEPT_ERROR_PAUSE = 0.1  # after EMFILE and the like: no busy loop on accept()
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

SHARES_FILE = "smtp-shares"  # in data_dir: the connection count of each smtp process
NOT_ACCEPTING = -1  # a slot's value while its process is not (or no longer) accepting
_SLOT = struct.Struct("=q")


class AcceptShares:
    """The smtp processes' connection counts, one 8-byte slot each in a file
    every process maps.  Counts are advisory: a stale or torn read only
    makes one accept a little early or late, never refuses a client.
    ``caps``: the connection caps all of them count in (net/caps.py)."""

    def __init__(self, path: Path, index: int, caps: SharedCaps) -> None:
        self.index = index
        self.caps = caps
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.count = os.fstat(fd).st_size // _SLOT.size
            if not 0 <= index < self.count:
                raise ValueError(f"{path}: no slot {index} among {self.count}")
            self._map = mmap.mmap(fd, _SLOT.size * self.count)
        finally:
            os.close(fd)
        self._mine = 0
        self._accepting = False

    @classmethod
    def create(cls, data_dir: Path, count: int, max_connections: int) -> AcceptShares:
        """The server's (index 0) view, every other slot "not accepting" yet,
        and a caps table for ``max_connections`` in all."""
        path = data_dir / SHARES_FILE
        # A new file put in place, never one truncated under a running
        # server's map (a second ``serve`` started by mistake would kill it).
        fresh = data_dir / f".{SHARES_FILE}.{os.getpid()}"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _SLOT.pack(NOT_ACCEPTING) * count)
        finally:
            os.close(fd)
        os.replace(fresh, path)
        return cls(path, 0, SharedCaps.create(data_dir, count, max_connections))

    @classmethod
    def open(cls, data_dir: Path, index: int) -> AcceptShares:
        """An extra smtp process's view (the server created the file)."""
        return cls(data_dir / SHARES_FILE, index, SharedCaps.open(data_dir, index))

    def _set(self, index: int, value: int) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, value)

    @property
    def held(self) -> int:
        """Connections this process holds (as it last published them)."""
        return self._mine

    def opened(self) -> None:
        self._mine += 1
        if self._accepting:
            self._set(self.index, self._mine)

    def closed(self) -> None:
        self._mine = max(0, self._mine - 1)
        if self._accepting:  # a stopping process stays out of the sharing
            self._set(self.index, self._mine)

    def accepting(self, yes: bool) -> None:
        """Join (with the connections held now) or leave the sharing."""
        self._accepting = yes
        self._set(self.index, self._mine if yes else NOT_ACCEPTING)

    def mark_gone(self, index: int) -> None:
        """Process ``index`` died: the others stop waiting for it to accept, and
        the connections it counted no longer count (the kernel closed them)."""
        self._set(index, NOT_ACCEPTING)
        self.caps.release_process(index)

    def my_turn(self) -> bool:
        """No other accepting process holds fewer connections than this one,
        give or take a slack that grows with the load (one in 16, at least
        one): 20 sessions split at worst 11/9, and a burst of thousands is
        accepted in runs instead of strictly in turn, one wake-up each."""
        counts: list[int] = [
            _SLOT.unpack_from(self._map, i * _SLOT.size)[0]
            for i in range(self.count)
            if i != self.index
        ]
        others = [c for c in counts if c != NOT_ACCEPTING]
        if not others:
            return True
        least = min(others)
        return self._mine <= least + 1 + least // 16

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        self.caps.close()


# What an Acceptor hands on: the accepted socket and the peer's address.
OnAccept = Callable[[socket.socket, Any], None]


class Acceptor:
    """Accepts on ``sockets`` by itself, one connection per wake-up, and
    hands each to ``on_accept``; with ``shares``, only in this process's turn."""

    def __init__(
        self,
        name: str,
        sockets: list[socket.socket],
        on_accept: OnAccept,
        shares: AcceptShares | None = None,
    ) -> None:
        self.name = name
        self.sockets = sockets
        self._on_accept = on_accept
        self.shares = shares
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume_handles: dict[int, asyncio.TimerHandle] = {}
        self._deferring_since: float | None = None
        self._last_deferral = 0.0
        self._accepting = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for sock in self.sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        self._accepting = True
        if self.shares is not None:
            self.shares.accepting(True)

    def stop(self) -> None:
        """Stop accepting and close the listening sockets."""
        if not self._accepting or self._loop is None:
            return
        self._accepting = False
        for handle in self._resume_handles.values():
            handle.cancel()
        self._resume_handles.clear()
        for sock in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if self.shares is not None:
            self.shares.accepting(False)

    def _pause(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, delay: float) -> None:
        fd = sock.fileno()
        loop.remove_reader(fd)
        self._resume_handles[fd] = loop.call_later(delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._resume_handles.pop(sock.fileno(), None)
        if self._accepting and self._loop is not None:
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)

    def _on_acceptable(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        shares = self.shares
        if shares is not None and not shares.my_turn():
            now = loop.time()
            if self._deferring_since is None or now - self._last_deferral > 4 * DEFER_SECONDS:
                self._deferring_since = now  # a new wait (the last one ended)
            self._last_deferral = now
            if now - self._deferring_since < MAX_DEFER_SECONDS:
                self._pause(loop, sock, DEFER_SECONDS)
                return
        try:
            client, address = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return  # another process took it, or the client gave up meanwhile
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                return  # a network error passed on by accept(2): the next one may be fine
            log.error("%s: cannot accept: %s", self.name, exc)
            self._pause(loop, sock, ACCEPT_ERROR_PAUSE)  # no busy loop while out of descriptors
            return
        self._deferring_since = None
        self._on_accept(client, address)


def bind(address: ListenAddress) -> list[socket.socket]:
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
