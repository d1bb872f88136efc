"""The ``[listen] metrics`` endpoint: GET /metrics in Prometheus' text format.

A tiny HTTP/1.x responder on the event loop, so that no thread or second
server runs beside the mail listeners.  It is bounded so that a scraper (or
anyone who reaches the port) cannot hold the loop or memory: one request
head of at most 8 KiB, read within 10 s; a few scrapes at once; then the
connection is closed (``Connection: close``, RFC 9112 §9.6).  Reading the
multiprocess files and rendering the text is blocking work, done in the
executor; the queue gauges are read on the loop first (the queue's state
belongs to the loop).  Every path but /metrics is 404; other methods 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor

from postoffice import metrics
from postoffice.config.settings import ListenAddress
from postoffice.net.accept import bind

log = logging.getLogger("postoffice.metrics")

PATH = "/metrics"
MAX_HEAD = 8192
READ_SECONDS = 10.0
MAX_SCRAPES = 4  # at once; more are answered 503
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsEndpoint:
    def __init__(
        self,
        addresses: tuple[ListenAddress, ...],
        executor: Executor,
        queue_stats: Callable[[], tuple[int, float | None]] | None = None,
    ) -> None:
        self.name = "metrics"
        self.addresses = addresses
        self.bound: list[tuple[str, int]] = []
        self._executor = executor
        self._queue_stats = queue_stats
        self._servers: list[asyncio.Server] = []
        self._busy = 0

    async def start(self, prebound: list[socket.socket] | None = None) -> None:
        """Listen on ``addresses``, or on ``prebound``: the sockets a server
        started as root bound for them before it dropped root ([run])."""
        groups = [prebound] if prebound else [bind(address) for address in self.addresses]
        for sockets in groups:
            for sock in sockets:
                name = sock.getsockname()
                self.bound.append((str(name[0]), int(name[1])))
                self._servers.append(
                    await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)
                )

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_SECONDS):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._reply(writer, 431, b"request head too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            status, body = await self._answer(head)
            await self._reply(writer, status, body, ok=status == 200)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[int, bytes]:
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            return 400, b"bad request\n"
        method, target = request_line[0], request_line[1]
        # A query string is allowed (Prometheus may add one); the path must match.
        if target.split(b"?", 1)[0] != PATH.encode():
            return 404, b"not found; try /metrics\n"
        if method != b"GET":
            return 405, b"GET only\n"
        if self._busy >= MAX_SCRAPES:
            return 503, b"too many scrapes at once\n"
        self._busy += 1
        try:
            queue = self._queue_stats() if self._queue_stats is not None else None
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(
                self._executor, metrics.exposition, queue, time.time()
            )
        except Exception:
            log.exception("metrics: the scrape failed")
            return 500, b"scrape failed\n"
        finally:
            self._busy -= 1
        return 200, text

    async def _reply(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, ok: bool = False
    ) -> None:
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        reasons |= {431: "Request Header Fields Too Large", 500: "Server Error"}
        reason = reasons.get(status, "Service Unavailable")
        kind = CONTENT_TYPE if ok else "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        async with asyncio.timeout(READ_SECONDS):
            await writer.drain()
