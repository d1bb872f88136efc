"""The [cluster] queue store against a real PostgreSQL: a message streamed in
chunks and read back whole, nothing left by a discarded one, and fencing: a
node whose lease ended and whose message another node claimed writes
nothing about it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from postoffice.delivery.queue.pg_store import ClaimLost, PgClaimedMessage, PgQueueStore
from postoffice.delivery.queue.records import QueueError, RecipientState
from postoffice.delivery.queue.store import Released, Removal
from postoffice.delivery.queue.writer import SPILL_THRESHOLD
from postoffice.mail.address import Address

SENDER = Address("alice", "example.test")
BOB = Address("bob", "remote.test")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4)
    yield pool
    pool.shutdown()


def count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


async def read_all(work: PgClaimedMessage) -> bytes:
    traits = await work.traits()
    return b"".join([c async for c in work.message(traits).chunks()])


def test_a_large_message_is_stored_in_chunks_and_read_back_whole(
    pg_url: str, executor: ThreadPoolExecutor
) -> None:
    store = PgQueueStore(pg_url, "node-a", executor)
    line = b"0123456789" * 7 + b"\n"
    content = b"Subject: big\n\n" + line * 5000  # about 350 KB, written 8 KB at a time

    async def main() -> bytes:
        writer = store.writer(SENDER, [BOB])
        for i in range(0, len(content), 8192):
            await writer.write(content[i : i + 8192])
        # Streamed out before the commit: memory held is one chunk.
        assert count(pg_url, "queue_bodies") >= len(content) // SPILL_THRESHOLD - 1
        assert count(pg_url, "queue_messages") == 0  # not committed: not queued
        queue_id = await writer.commit()
        [claim] = store.claims.claim(10, 60)
        assert claim.queue_id == queue_id
        work = await store.claim(claim)
        assert work is not None
        assert [r.address for r in work.entry.recipients] == [BOB]
        assert (await work.read_head(9)) == b"Subject: "
        whole = await read_all(work)
        # A chunk gone (cannot happen short of damage): an error, never a
        # shorter message sent.
        with psycopg.connect(pg_url) as conn:
            conn.execute("DELETE FROM queue_bodies WHERE seq = 1")
        with pytest.raises(QueueError, match="expected"):
            await read_all(work)
        return whole

    try:
        assert asyncio.run(main()) == content
    finally:
        store.close()


def test_a_discarded_message_leaves_nothing(pg_url: str, executor: ThreadPoolExecutor) -> None:
    store = PgQueueStore(pg_url, "node-a", executor)

    async def main() -> None:
        writer = store.writer(SENDER, [BOB])
        await writer.write(b"x" * (3 * SPILL_THRESHOLD))
        assert count(pg_url, "queue_bodies") > 0
        await writer.discard()

    try:
        asyncio.run(main())
        assert count(pg_url, "queue_bodies") == 0
        assert count(pg_url, "queue_claims") == 0
    finally:
        store.close()


def test_a_node_that_lost_its_claim_writes_nothing(
    pg_url: str, executor: ThreadPoolExecutor
) -> None:
    a = PgQueueStore(pg_url, "node-a", executor)
    b = PgQueueStore(pg_url, "node-b", executor)

    async def main() -> None:
        writer = a.writer(SENDER, [BOB])
        await writer.write(b"Subject: fenced\n\nhello\n")
        await writer.commit()
        [first] = a.claims.claim(10, 1.0)
        work_a = await a.claim(first)
        assert work_a is not None
        assert b.claims.claim(10, 60) == []  # held: nobody else gets it
        time.sleep(1.3)  # the lease ends without renewal
        [second] = b.claims.claim(10, 60)
        assert second.previous == "node-a"
        work_b = await b.claim(second)
        assert work_b is not None
        # Node A finishes late: it may neither record a result nor drop the message.
        work_a.entry.recipients[0].state = RecipientState.DELIVERED
        with pytest.raises(ClaimLost):
            await work_a.save()
        with pytest.raises(ClaimLost):
            await work_a.release(time.time)
        assert count(pg_url, "queue_messages") == 1
        assert a.claims.renew(first, 60) is False
        # Node B's outcome counts.
        work_b.entry.recipients[0].state = RecipientState.DELIVERED
        assert await work_b.release(time.time) is Released.FINISHED

    try:
        asyncio.run(main())
        for table in ("queue_messages", "queue_bodies", "queue_claims"):
            assert count(pg_url, table) == 0, table
    finally:
        a.close()
        b.close()


def queue_one(store: PgQueueStore, subject: str) -> str:
    async def main() -> str:
        writer = store.writer(SENDER, [BOB])
        await writer.write(f"Subject: {subject}\n\nhello\n".encode())
        return await writer.commit()

    return asyncio.run(main())


def test_queue_remove_waits_for_the_attempt_that_holds_the_message(
    pg_url: str, executor: ThreadPoolExecutor
) -> None:
    store = PgQueueStore(pg_url, "node-a", executor)
    try:
        idle = queue_one(store, "idle")
        held = queue_one(store, "held")
        assert store.remove_blocking(idle) is Removal.REMOVED
        assert store.remove_blocking(idle) is Removal.MISSING
        [claim] = store.claims.claim(10, 60)
        assert claim.queue_id == held

        async def attempt() -> Released:
            work = await store.claim(claim)
            assert work is not None
            # Asked while the attempt runs: it goes on, the message goes after.
            assert store.remove_blocking(held) is Removal.REQUESTED
            assert count(pg_url, "queue_messages") == 1
            work.entry.recipients[0].state = RecipientState.DEFERRED
            return await work.release(time.time)

        assert asyncio.run(attempt()) is Released.REMOVED
        for table in ("queue_messages", "queue_bodies", "queue_claims"):
            assert count(pg_url, table) == 0, table
    finally:
        store.close()


def test_queue_flush_makes_a_deferred_message_due_now(
    pg_url: str, executor: ThreadPoolExecutor
) -> None:
    store = PgQueueStore(pg_url, "node-a", executor)
    try:
        queue_one(store, "later")
        [claim] = store.claims.claim(10, 60)

        async def defer() -> Released:
            work = await store.claim(claim)
            assert work is not None
            r = work.entry.recipients[0]
            r.state, r.next_try = RecipientState.DEFERRED, time.time() + 3600
            return await work.release(time.time)

        assert asyncio.run(defer()) is Released.KEPT
        assert store.claims.claim(10, 60) == []  # due in an hour
        assert store.flush_blocking() == 1
        [again] = store.claims.claim(10, 60)
        assert again.flush
        assert store.claims.retry(again, 0)
        [third] = store.claims.claim(10, 60)
        assert not third.flush  # told once
    finally:
        store.close()
