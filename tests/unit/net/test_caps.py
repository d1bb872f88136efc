"""SharedCaps: the smtp processes' connection caps in one table (net/caps.py)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.net.caps import SharedCaps


@pytest.fixture
def views(tmp_path: Path) -> Iterator[tuple[SharedCaps, SharedCaps, SharedCaps]]:
    """The server's view and two extra processes', one table."""
    server = SharedCaps.create(tmp_path, 3, 1000)
    one, two = SharedCaps.open(tmp_path, 1), SharedCaps.open(tmp_path, 2)
    yield server, one, two
    for view in (server, one, two):
        view.close()


def test_the_per_address_cap_counts_every_process(
    views: tuple[SharedCaps, SharedCaps, SharedCaps],
) -> None:
    server, one, two = views
    assert server.admit("192.0.2.1", 100, 3)
    assert one.admit("192.0.2.1", 100, 3)
    assert two.admit("192.0.2.1", 100, 3)
    # Each process holds one: a per-process count would admit two more each.
    assert not server.admit("192.0.2.1", 100, 3)
    assert not one.admit("192.0.2.1", 100, 3)
    assert one.admit("192.0.2.2", 100, 3)  # another client is another count
    one.release("192.0.2.1")
    assert two.admit("192.0.2.1", 100, 3)  # the slot one gave back
    assert server.held("192.0.2.1") == 3 and server.held() == 4


def test_the_total_cap_counts_every_process(
    views: tuple[SharedCaps, SharedCaps, SharedCaps],
) -> None:
    server, one, two = views
    assert server.admit("192.0.2.1", 3, 100)
    assert one.admit("192.0.2.2", 3, 100)
    assert two.admit("192.0.2.3", 3, 100)
    assert not server.admit("192.0.2.4", 3, 100)
    two.release("192.0.2.3")
    assert server.admit("192.0.2.4", 3, 100)


def test_a_dead_process_s_counts_are_given_back(
    views: tuple[SharedCaps, SharedCaps, SharedCaps],
) -> None:
    server, one, two = views
    for _ in range(2):
        assert one.admit("2001:db8::/64", 100, 4)
        assert two.admit("2001:db8::/64", 100, 4)
    assert not server.admit("2001:db8::/64", 100, 4)
    server.release_process(1)  # process 1 was killed holding two
    assert server.held("2001:db8::/64") == 2 and server.held() == 2
    assert server.admit("2001:db8::/64", 100, 4)
    server.release_process(2)
    assert server.held() == 1 and server.held("2001:db8::/64") == 1


def test_the_table_agrees_with_plain_counts_through_any_churn(
    views: tuple[SharedCaps, SharedCaps, SharedCaps],
) -> None:
    """Thousands of keys (probe chains, removals shifting slots back, a dead
    process's rebuild) against a Counter per process: never a count lost."""
    rng = random.Random(15)
    model = [Counter[str](), Counter[str](), Counter[str]()]
    keys = [f"198.51.{n // 256}.{n % 256}" for n in range(2500)]
    for step in range(30000):
        index = rng.randrange(3)
        view = views[index]
        key = rng.choice(keys)
        if model[index][key] and rng.random() < 0.45:
            view.release(key)
            model[index][key] -= 1
        elif view.admit(key, 3000, 4):
            model[index][key] += 1
        else:
            total = sum(sum(m.values()) for m in model)
            assert total >= 3000 or sum(m[key] for m in model) >= 4
        if step % 10000 == 9999:
            views[0].release_process(2)
            model[2].clear()
    for key in keys:
        assert views[1].held(key) == sum(m[key] for m in model), key
    assert views[2].held() == sum(sum(m.values()) for m in model)


def test_a_shift_cut_short_by_kill_9_is_repaired(
    views: tuple[SharedCaps, SharedCaps, SharedCaps],
) -> None:
    """A slot copied back but not yet emptied (the copier died between the two
    writes): the rebuild merges the copies by the larger count, never adds."""
    server, one, _two = views
    assert server.admit("192.0.2.9", 100, 5)
    assert server.admit("192.0.2.9", 100, 5)
    slot, found = server._find(server._hash("192.0.2.9"))
    assert found
    row = server._read(slot)
    server._write((slot + 1) % server.slots, row)  # the stray copy
    server.release_process(1)
    assert one.held("192.0.2.9") == 2
    server.release("192.0.2.9")
    server.release("192.0.2.9")
    assert one.held("192.0.2.9") == 0 and one.held() == 0


def test_a_stale_larger_copy_left_by_kill_9_does_not_leak(
    views: tuple[SharedCaps, SharedCaps, SharedCaps],
) -> None:
    """A shift copied a slot back and its copier died before emptying the
    original; the live copy (found first from home) then went down, the
    stale one still says more.  The rebuild keeps the live count."""
    server, one, _two = views
    for _ in range(3):
        assert server.admit("192.0.2.9", 100, 5)
    slot, found = server._find(server._hash("192.0.2.9"))
    assert found
    stale = server._read(slot)  # count 3
    server._write((slot + 1) % server.slots, stale)  # the original, never emptied
    server.release("192.0.2.9")  # the live copy (at home) goes down to 2
    server.release("192.0.2.9")  # and to 1
    server.release_process(1)
    assert one.held("192.0.2.9") == 1
    server.release("192.0.2.9")
    assert one.held("192.0.2.9") == 0 and one.held() == 0
    # The per-address cap is whole again: five admitted, not two.
    assert all(server.admit("192.0.2.9", 100, 5) for _ in range(5))
