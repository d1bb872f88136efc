"""Worker processes for CPU work on attacker input (policy/cpu_workers.py):
real child processes running tests/unit/policy/cpu_targets.py."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.policy.cpu_workers import CpuTimeout, CpuWorkerError, CpuWorkers

TARGETS = "tests.unit.policy.cpu_targets"
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _targets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Workers run with -P (no working directory on sys.path): say where tests/ is.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))


@pytest.fixture
def pool() -> Iterator[CpuWorkers]:
    workers = CpuWorkers(f"{TARGETS}:pid", workers=2, timeout=30)
    yield workers
    workers.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone too: it only waits for its parent to read its status.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_jobs_run_in_other_processes_which_are_reused(pool: CpuWorkers) -> None:
    pool.start()
    started = set(pool.pids)
    assert len(started) == 2 and os.getpid() not in started

    async def many() -> list[bytes]:
        return await asyncio.gather(*(pool.run(b"", b"") for _ in range(8)))

    pids = {int(answer) for answer in asyncio.run(many())}
    assert pids <= started  # eight jobs, queued behind two processes, no third one
    assert set(pool.pids) == started


def test_header_and_payload_arrive_whole() -> None:
    pool = CpuWorkers(f"{TARGETS}:echo", workers=1, timeout=30)
    try:
        payload = os.urandom(900_000)  # many times a pipe's buffer, both ways
        answer = asyncio.run(pool.run(b"meta", payload))
        assert answer == b"meta|" + payload
        assert asyncio.run(pool.run(b"", b"")) == b"|"
    finally:
        pool.close()


def test_a_job_past_its_deadline_is_killed_and_its_process_replaced() -> None:
    pool = CpuWorkers(f"{TARGETS}:spin", workers=1, timeout=0.5)
    try:
        pool.start()
        [first] = pool.pids
        started = time.monotonic()
        with pytest.raises(CpuTimeout):
            asyncio.run(pool.run(b"60", b""))  # a minute of CPU, cut off
        assert time.monotonic() - started < 30  # long before the job would end
        assert not alive(first)
        assert asyncio.run(pool.run(b"0", b"")).isdigit()  # a fresh process
        [second] = pool.pids
        assert second != first
    finally:
        pool.close()


def test_the_loop_runs_while_a_job_computes() -> None:
    pool = CpuWorkers(f"{TARGETS}:spin", workers=1, timeout=30)

    async def main() -> int:
        job = asyncio.ensure_future(pool.run(b"1.0", b""))
        ticks = 0
        while not job.done():  # bounded: the job ends after one second
            await asyncio.sleep(0.01)
            ticks += 1
        await job
        return ticks

    try:
        assert asyncio.run(main()) > 10  # the loop kept turning throughout
    finally:
        pool.close()


def test_a_function_that_raises_is_an_error_and_the_process_stays() -> None:
    pool = CpuWorkers(f"{TARGETS}:fail", workers=1, timeout=30)
    try:
        pool.start()
        [pid] = pool.pids
        with pytest.raises(CpuWorkerError, match="ValueError: bad input"):
            asyncio.run(pool.run(b"", b""))
        assert pool.pids == [pid]
    finally:
        pool.close()


def test_a_process_that_dies_is_an_error_and_is_replaced() -> None:
    pool = CpuWorkers(f"{TARGETS}:die", workers=1, timeout=30)
    try:
        pool.start()
        [pid] = pool.pids
        with pytest.raises(CpuWorkerError, match="gone"):
            asyncio.run(pool.run(b"", b""))
        assert not alive(pid)
        with pytest.raises(CpuWorkerError):
            asyncio.run(pool.run(b"", b""))  # a new process, which dies too
        assert pid not in pool.pids
    finally:
        pool.close()


def test_close_stops_every_process(pool: CpuWorkers) -> None:
    pool.start()
    pids = pool.pids
    pool.close()
    assert pids and not any(alive(p) for p in pids)
    with pytest.raises(CpuWorkerError):
        asyncio.run(pool.run(b"", b""))
