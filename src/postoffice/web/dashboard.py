"""The admin dashboard's plots: traffic per hour and the queue, from the
server's own metrics, drawn as inline SVG (no external service, no script).

``TrafficHistory`` keeps one sample a minute (``SAMPLE_SECONDS``) of the
cumulative counters (metrics.traffic_totals: received, delivered, deferred,
bounced) and of the queue's size and oldest age, for ``HOURS`` hours at
most (a bounded deque).  An hour's count is its last sample minus the last
sample before it (0 before the first: the counters start with the server).
The dashboard takes a fresh sample when shown, so the current hour is up
to date.  The history lives in memory: a restart starts it again, as the
counters do.

Plots are bars drawn here from numbers, each with a <title> (a tooltip and
a screen reader's text) and a table beside it with the same numbers; the
SVG uses presentation attributes, not style=, which the CSP forbids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from postoffice import metrics

SAMPLE_SECONDS = 60.0
HOURS = 24
MAX_SAMPLES = int(HOURS * 3600 / SAMPLE_SECONDS) + 120  # a day, and room for extra views
MIN_SAMPLE_GAP = 1.0  # dashboard views faster than this reuse the last sample
COLOURS = {
    "received": "#1d3557",
    "delivered": "#2a7a3b",
    "deferred": "#b36b00",
    "bounced": "#b00020",
    "queue": "#5a3d8a",
    "queue age (minutes)": "#3d5a8a",
}


@dataclass(frozen=True, slots=True)
class Sample:
    time: float  # time.time()
    totals: dict[str, float]
    queue_size: int
    queue_age: float


@dataclass(frozen=True, slots=True)
class Bar:
    x: int
    y: int
    height: int
    label: str  # "14:00 received: 3"


@dataclass(frozen=True, slots=True)
class Plot:
    name: str
    colour: str
    bars: tuple[Bar, ...]
    rows: tuple[tuple[str, int], ...]  # (hour, value): the table beside the plot
    top: int  # the scale's maximum
    total: int


PLOT_WIDTH, PLOT_HEIGHT, BAR_WIDTH = 480, 120, 20


class TrafficHistory:
    def __init__(
        self,
        read_totals: Callable[[], dict[str, float]],
        read_queue: Callable[[], tuple[int, float | None]] | None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read_totals = read_totals
        self._read_queue = read_queue
        self._executor = executor
        self._clock = clock
        self.samples: deque[Sample] = deque(maxlen=MAX_SAMPLES)

    def sample(self, totals: dict[str, float]) -> Sample:
        """Record ``totals`` (read off the loop by the caller) with the queue now."""
        now = self._clock()
        size, oldest = self._read_queue() if self._read_queue else (0, None)
        taken = Sample(now, totals, size, max(0.0, now - oldest) if oldest else 0.0)
        self.samples.append(taken)
        return taken

    def fresh_enough(self) -> bool:
        return bool(self.samples) and self._clock() - self.samples[-1].time < MIN_SAMPLE_GAP

    def hourly(self, name: str) -> list[tuple[int, int]]:
        """(hour start, count) for the last HOURS hours, oldest first."""
        now = self._clock()
        current = int(now // 3600) * 3600
        starts = [current - 3600 * i for i in range(HOURS - 1, -1, -1)]
        result = []
        for start in starts:
            before = [s for s in self.samples if s.time < start]
            within = [s for s in self.samples if start <= s.time < start + 3600]
            if not within:
                result.append((start, 0))
                continue
            base = before[-1].totals.get(name, 0.0) if before else 0.0
            result.append((start, max(0, round(within[-1].totals.get(name, 0.0) - base))))
        return result

    def queue_hourly(self) -> list[tuple[int, int]]:
        """(hour start, the largest queue size sampled in it)."""
        return self._largest(lambda s: s.queue_size)

    def queue_age_hourly(self) -> list[tuple[int, int]]:
        """(hour start, the oldest queued message's largest age in it, in minutes)."""
        return self._largest(lambda s: round(s.queue_age / 60))

    def _largest(self, value: Callable[[Sample], int]) -> list[tuple[int, int]]:
        current = int(self._clock() // 3600) * 3600
        result = []
        for i in range(HOURS - 1, -1, -1):
            start = current - 3600 * i
            values = [value(s) for s in self.samples if start <= s.time < start + 3600]
            result.append((start, max(values, default=0)))
        return result

    async def take(self) -> None:
        """A sample now (the counters read in the executor), unless one was just taken."""
        if self.fresh_enough():
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, ValueError):
            self.sample(await loop.run_in_executor(self._executor, self._read_totals))

    async def run(self) -> None:
        """Sample every SAMPLE_SECONDS until cancelled (the server's background task)."""
        while True:
            await self.take()
            await asyncio.sleep(SAMPLE_SECONDS)


def plot(name: str, hourly: list[tuple[int, int]]) -> Plot:
    values = tuple(v for _h, v in hourly)
    hours = tuple(time.strftime("%H:00", time.localtime(h)) for h, _v in hourly)
    top = max(1, *values)
    bars = []
    for i, (hour, value) in enumerate(zip(hours, values, strict=True)):
        height = round(value * (PLOT_HEIGHT - 10) / top)
        bars.append(Bar(i * BAR_WIDTH, PLOT_HEIGHT - height, height, f"{hour} {name}: {value}"))
    rows = tuple(zip(hours, values, strict=True))
    return Plot(name, COLOURS[name], tuple(bars), rows, top, sum(values))


def history_for(
    executor: Executor, queue_stats: Callable[[], tuple[int, float | None]] | None
) -> TrafficHistory:
    return TrafficHistory(metrics.traffic_totals, queue_stats, executor)
