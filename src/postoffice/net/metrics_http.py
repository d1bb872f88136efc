"""The ``[listen] metrics`` endpoint: GET /metrics in Prometheus' text format.

A route on the one HTTP core (net/http.py: head and time bounds, 404/405,
HEAD) run by an ordinary listener (net/listener.py: connection caps, moved
by a reload like the others).  Reading the multiprocess files and rendering
the text is blocking work, done in the executor; the queue gauges are read
on the loop first (the queue's state belongs to the loop).  However many
connections ask at once, one rendering runs and they all get it: anyone who
reaches the port holds at most one executor thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from postoffice import metrics
from postoffice.net.http import Request, Response, Routes

log = logging.getLogger("postoffice.metrics")

PATH = "/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

QueueStats = Callable[[], tuple[int, float | None]]


class MetricsRoute:
    """GET /metrics: one rendering at a time, shared by those who asked meanwhile."""

    def __init__(self, executor: Executor, queue_stats: QueueStats | None = None) -> None:
        self._executor = executor
        self._queue_stats = queue_stats
        self._rendering: asyncio.Future[bytes] | None = None

    def add_to(self, routes: Routes) -> None:
        routes.add(PATH, self.answer)

    async def answer(self, request: Request) -> Response:
        del request  # a query string is allowed (Prometheus may add one) and ignored
        try:
            text = await self.text()
        except Exception:
            log.exception("metrics: the scrape failed")
            return Response.text(500, "scrape failed")
        return Response(200, text, CONTENT_TYPE)

    async def text(self) -> bytes:
        if self._rendering is None:
            queue = self._queue_stats() if self._queue_stats is not None else None
            loop = asyncio.get_running_loop()
            self._rendering = asyncio.ensure_future(
                loop.run_in_executor(self._executor, metrics.exposition, queue, time.time())
            )
            self._rendering.add_done_callback(self._done)
        # Shielded: one client hanging up does not cancel the others' rendering.
        return await asyncio.shield(self._rendering)

    def _done(self, future: asyncio.Future[bytes]) -> None:
        del future
        self._rendering = None


def metrics_routes(executor: Executor, queue_stats: QueueStats | None = None) -> Routes:
    """The routes of [listen] metrics: /metrics alone."""
    routes = Routes()
    MetricsRoute(executor, queue_stats).add_to(routes)
    return routes
