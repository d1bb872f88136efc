"""QueueClaims against a real PostgreSQL: due rows only, SKIP LOCKED keeps
racing nodes apart, leases end and are taken over, and a node that lost its
claim cannot write an outcome (fencing)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from postoffice.cluster.queue_claims import MAX_BATCH, QueueClaims


@pytest.fixture
def node(pg_url: str) -> Iterator[Callable[[str], QueueClaims]]:
    opened: list[QueueClaims] = []

    def make(name: str) -> QueueClaims:
        opened.append(QueueClaims(pg_url, name))
        return opened[-1]

    try:
        yield make
    finally:
        for claims in opened:
            claims.close()


def test_only_due_messages_are_claimed_oldest_first(node: Callable[[str], QueueClaims]) -> None:
    a = node("a")
    a.add("later", delay=3600)
    a.add("second", delay=-10)
    a.add("first", delay=-20)
    a.add("first", delay=3600)  # already queued: unchanged
    assert [c.queue_id for c in a.claim(10, lease=60)] == ["first", "second"]
    assert a.claim(10, lease=60) == []  # held, and "later" is not due


def test_racing_nodes_never_claim_the_same_message(node: Callable[[str], QueueClaims]) -> None:
    adder = node("adder")
    for i in range(200):
        adder.add(f"m{i:03}")
    racers = [node(f"n{i}") for i in range(3)]
    got: dict[str, list[str]] = {r.node: [] for r in racers}

    def run(claims: QueueClaims) -> None:
        for _ in range(100):  # bounded: 200 rows, 5 at a time
            batch = claims.claim(5, lease=60)
            if not batch:
                return
            got[claims.node] += [c.queue_id for c in batch]

    threads = [threading.Thread(target=run, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [q for ids in got.values() for q in ids]
    assert sorted(everything) == [f"m{i:03}" for i in range(200)]  # each exactly once


def test_an_expired_lease_is_taken_over_and_the_old_claim_fenced(
    node: Callable[[str], QueueClaims],
) -> None:
    a, b = node("a"), node("b")
    a.add("msg")
    [mine] = a.claim(1, lease=0.3)
    assert mine.previous is None
    assert b.claim(1, lease=60) == []
    time.sleep(0.5)  # a stalls past its lease (or died)
    [theirs] = b.claim(1, lease=60)
    assert (theirs.queue_id, theirs.previous) == ("msg", "a")
    assert theirs.token > mine.token
    # a's late outcome is refused and changes nothing.
    assert not a.renew(mine, lease=60)
    assert not a.retry(mine, delay=0)
    assert not a.done(mine)
    assert a.claim(1, lease=60) == []  # still b's
    assert b.done(theirs)
    assert b.claim(1, lease=60) == []  # gone


def test_renewing_keeps_the_claim(node: Callable[[str], QueueClaims]) -> None:
    a, b = node("a"), node("b")
    a.add("msg")
    [mine] = a.claim(1, lease=0.4)
    for _ in range(3):
        time.sleep(0.2)
        assert a.renew(mine, lease=0.4)
        assert b.claim(1, lease=60) == []


def test_retry_gives_the_message_back_for_later(node: Callable[[str], QueueClaims]) -> None:
    a, b = node("a"), node("b")
    a.add("msg")
    [mine] = a.claim(1, lease=60)
    assert a.retry(mine, delay=0.3)
    assert b.claim(1, lease=60) == []  # not due yet
    time.sleep(0.5)
    [again] = b.claim(1, lease=60)
    assert again.previous is None  # given back, not taken over


def test_bounds(node: Callable[[str], QueueClaims], pg_url: str) -> None:
    a = node("a")
    for limit, lease in ((0, 1.0), (MAX_BATCH + 1, 1.0), (1, 0.0)):
        with pytest.raises(ValueError):
            a.claim(limit, lease)
    with pytest.raises(ValueError):
        QueueClaims(pg_url, "")
