"""HashingPool: password checks on threads of their own, a bounded number at
a time, known-good logins first, a bounded queue for the rest."""

from __future__ import annotations

import asyncio
import threading

import pytest

from postoffice.policy.auth import HashingPool, HashQueueFull
from tests.support.helpers import until


class Gate:
    """A job that holds its thread until the test opens the gate, and says
    which thread ran it and in what order jobs started."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started: list[str] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def job(self, name: str) -> str:
        with self.lock:
            self.started.append(name)
            self.threads.add(threading.current_thread().name)
        assert self.open.wait(10)
        return name


def test_runs_at_most_workers_at_once_known_good_first_and_refuses_past_the_queue() -> None:
    async def main() -> None:
        pool = HashingPool(workers=2, max_waiting=3)
        gate = Gate()
        try:
            busy = [asyncio.create_task(pool.run(gate.job, f"busy{i}")) for i in range(2)]
            assert await until(lambda: len(gate.started) == 2)
            others = [asyncio.create_task(pool.run(gate.job, f"other{i}")) for i in range(3)]
            await asyncio.sleep(0.05)
            with pytest.raises(HashQueueFull):  # a fourth waiter is one too many
                await pool.run(gate.job, "refused")
            owner = asyncio.create_task(pool.run(gate.job, "owner", priority=True))
            await asyncio.sleep(0.05)
            assert gate.started == ["busy0", "busy1"]  # nothing past the two threads
            gate.open.set()
            results = await asyncio.gather(*busy, *others, owner)
            assert sorted(results) == ["busy0", "busy1", "other0", "other1", "other2", "owner"]
            assert gate.started.index("owner") == 2  # the known-good login went first
            assert all(name.startswith("postoffice-hash") for name in gate.threads)
        finally:
            gate.open.set()
            pool.shutdown()

    asyncio.run(main())


def test_a_waiter_that_is_cancelled_gives_its_turn_on() -> None:
    async def main() -> None:
        pool = HashingPool(workers=1, max_waiting=5)
        gate = Gate()
        try:
            first = asyncio.create_task(pool.run(gate.job, "first"))
            assert await until(lambda: gate.started == ["first"])
            leaving = asyncio.create_task(pool.run(gate.job, "leaving"))
            staying = asyncio.create_task(pool.run(gate.job, "staying"))
            await asyncio.sleep(0.05)
            leaving.cancel()
            gate.open.set()
            assert await first == "first"
            assert await staying == "staying"
            with pytest.raises(asyncio.CancelledError):
                await leaving
            assert await pool.run(gate.job, "after") == "after"  # no thread was lost
            assert gate.started == ["first", "staying", "after"]
        finally:
            gate.open.set()
            pool.shutdown()

    asyncio.run(main())
