"""LoginThrottle as pure policy: a clock we move by hand, no sleeping.

The rules under test (policy/throttle.py): the failing (client, account)
pair is penalised first; budgets per account, per client address (IPv6:
per /64) and in all cap the rate whatever the number of addresses; a
known-good pair passes the budgets; nothing is ever held longer than
``max_delay``; throttling is logged once per key; memory is bounded.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.policy.throttle import Admission, LoginThrottle, ThrottleLimits

ALICE, BOB = "alice@example.test", "bob@example.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**limits: Any) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(ThrottleLimits(**limits), clock=clock), clock


def fail(t: LoginThrottle, ip: str, account: str, tag: bytes = b"") -> Admission:
    a = t.admit(ip, account, tag)
    assert a.refused_by is None and not a.repeat, a
    t.failed(a)
    return a


def succeed(t: LoginThrottle, ip: str, account: str) -> Admission:
    a = t.admit(ip, account)
    assert a.refused_by is None, a
    t.succeeded(a)
    return a


# --- the failing pair first -----------------------------------------------------------
def test_free_failures_then_slowed_failures_doubling_up_to_the_cap() -> None:
    t, clock = throttle(free_failures=3, max_delay=8.0)
    delays = []
    for _ in range(7):
        a = fail(t, "192.0.2.1", ALICE)
        assert a.wait == 0.0  # a serial client is never held before its check
        delays.append(a.fail_delay)
        clock.now += a.fail_delay  # the client gets its answer, then tries again
    assert delays == [0, 0, 0, 1, 2, 4, 8]


def test_a_right_password_after_failures_is_checked_at_once_and_clears_the_pair() -> None:
    t, clock = throttle(free_failures=3, max_delay=30.0)
    for _ in range(6):
        clock.now += fail(t, "192.0.2.1", ALICE).fail_delay
    right = succeed(t, "192.0.2.1", ALICE)
    assert right.wait == 0.0
    again = t.admit("192.0.2.1", ALICE)
    assert again.wait == 0.0 and again.fail_delay == 0.0  # the pair starts afresh


def test_one_failing_pair_does_not_slow_others_behind_the_same_address() -> None:
    # An office behind one NAT address: alice's phone has a stale password.
    t, clock = throttle(free_failures=3)
    for _ in range(6):
        clock.now += fail(t, "198.51.100.7", ALICE).fail_delay
    bob = t.admit("198.51.100.7", BOB)
    assert (bob.refused_by, bob.wait, bob.fail_delay) == (None, 0.0, 0.0)


def test_parallel_attempts_of_a_penalised_pair_take_turns_and_never_wait_past_the_cap() -> None:
    t, _clock = throttle(free_failures=0, max_delay=10.0)
    admitted = []
    for _ in range(20):  # twenty connections guess at the same moment
        a = t.admit("192.0.2.1", ALICE, b"")
        if a.refused_by is None:
            admitted.append(a)
            assert a.wait + a.fail_delay <= 10.0
        else:
            assert a.refused_by == "pair"
    # Turns 0, 1, 3 (1 s + 2 s), 7 (+ 4 s); the next would be held past 10 s.
    assert [a.wait for a in admitted] == [0.0, 1.0, 3.0]
    assert len(admitted) < 20


def test_a_repeated_wrong_password_is_answered_unchecked_and_not_counted() -> None:
    # A stale client retrying the same password is no new guess.
    t, _clock = throttle(free_failures=2)
    fail(t, "192.0.2.1", ALICE, tag=b"old1")
    for _ in range(10):
        a = t.admit("192.0.2.1", ALICE, b"old1")
        assert a.repeat and a.refused_by is None
    a = t.admit("192.0.2.1", ALICE, b"new2")
    assert not a.repeat and a.fail_delay == 0.0  # still the second failure: free
    t.failed(a)
    assert t.admit("192.0.2.1", ALICE, b"old1").repeat is False  # only the latest counts


def test_a_pairs_failures_are_forgotten_after_the_window() -> None:
    t, clock = throttle(free_failures=1, window=900.0)
    clock.now += fail(t, "192.0.2.1", ALICE).fail_delay
    assert fail(t, "192.0.2.1", ALICE).fail_delay == 1.0
    clock.now += 901
    assert t.admit("192.0.2.1", ALICE).fail_delay == 0.0


# --- budgets ----------------------------------------------------------------------------
def test_many_addresses_guessing_one_account_get_the_account_budget_and_no_more() -> None:
    t, clock = throttle(account_failures=10, window=900.0, max_delay=30.0)
    judged = refused = 0
    started = clock.now
    for n in range(2000):  # a botnet: every guess from a new address, 1 per second
        a = t.admit(f"10.{n // 250}.{n % 250}.1", ALICE)
        if a.refused_by:
            assert a.refused_by == "account"
            refused += 1
        else:
            assert a.wait + a.fail_delay <= 30.0
            clock.now += a.wait
            t.failed(a)
            judged += 1
        clock.now += 1.0
    # 10 at once, then one per window/10 = 90 s.
    elapsed = clock.now - started
    assert judged <= 10 + elapsed // 90 + 1, (judged, elapsed)
    assert judged >= 10 + elapsed // 90 - 1, (judged, elapsed)
    assert refused == 2000 - judged


def test_a_slot_within_the_cap_is_waited_for_rather_than_refused() -> None:
    t, _clock = throttle(account_failures=60, window=600.0, max_delay=30.0)  # one per 10 s
    for n in range(60):
        fail(t, f"10.0.0.{n}", ALICE)
    waits = [t.admit(f"10.0.1.{n}", ALICE) for n in range(5)]
    assert [a.wait for a in waits[:3]] == [10.0, 20.0, 30.0]  # booked turns, in order
    assert [a.refused_by for a in waits[3:]] == ["account", "account"]


def test_the_owner_from_a_known_good_address_gets_in_during_a_distributed_attack() -> None:
    t, clock = throttle(account_failures=5, global_failures=20)
    succeed(t, "203.0.113.9", ALICE)  # her usual address, last week
    clock.now += 7 * 86400
    for n in range(200):
        a = t.admit(f"10.0.{n // 250}.{n % 250}", ALICE)
        if not a.refused_by:
            t.failed(a)
    assert t.admit("10.9.9.9", ALICE).refused_by in ("account", "global")
    owner = t.admit("203.0.113.9", ALICE)
    assert (owner.refused_by, owner.wait, owner.known_good) == (None, 0.0, True)


def test_known_good_memory_expires() -> None:
    t, clock = throttle(known_good_for=3600.0)
    succeed(t, "203.0.113.9", ALICE)
    assert t.is_known_good("203.0.113.9", ALICE)
    clock.now += 3601
    assert not t.is_known_good("203.0.113.9", ALICE)


def test_one_address_guessing_many_accounts_meets_the_address_budget() -> None:
    t, _clock = throttle(address_failures=20, account_failures=0, max_delay=30.0)
    succeed(t, "192.0.2.1", BOB)  # a real user behind the same address
    verdicts = [t.admit("192.0.2.1", f"user{n}@example.test") for n in range(100)]
    for a in verdicts:
        if not a.refused_by:
            t.failed(a)
    assert sum(1 for a in verdicts if not a.refused_by) == 20
    assert {a.refused_by for a in verdicts[20:]} == {"address"}
    assert t.admit("192.0.2.1", BOB).refused_by is None  # known-good: exempt


def test_a_success_refunds_its_booking_but_does_not_reset_the_budgets() -> None:
    t, _clock = throttle(address_failures=3, account_failures=0, max_delay=1.0)
    for n in range(2):
        fail(t, "192.0.2.1", f"user{n}@example.test")
    succeed(t, "192.0.2.1", BOB)  # the third slot, given back
    fail(t, "192.0.2.1", "user2@example.test")  # ... so this one still fits
    assert t.admit("192.0.2.1", "user3@example.test").refused_by == "address"


def test_the_global_budget_holds_across_addresses_and_accounts() -> None:
    t, _clock = throttle(global_failures=50, window=900.0, max_delay=30.0)
    admitted = 0
    for n in range(500):
        a = t.admit(f"10.1.{n // 250}.{n % 250}", f"u{n}@example.test")
        if not a.refused_by:
            t.failed(a)
            admitted += 1
    assert admitted == 50 + 30 // 18  # the burst, and the turns within 30 s (one per 18 s)


def test_a_budget_of_zero_is_off() -> None:
    t, _clock = throttle(account_failures=0, address_failures=0, global_failures=0)
    for n in range(300):
        a = t.admit(f"10.2.{n // 250}.{n % 250}", ALICE)
        assert a.refused_by is None
        t.failed(a)


def test_an_abandoned_attempt_counts_for_nothing() -> None:
    t, _clock = throttle(account_failures=2, max_delay=1.0)
    for _ in range(5):
        t.abandoned(t.admit("10.3.0.1", ALICE))  # the client left before its check
    fail(t, "10.3.0.2", ALICE)
    fail(t, "10.3.0.3", ALICE)
    assert t.admit("10.3.0.4", ALICE).refused_by == "account"


# --- IPv6 ---------------------------------------------------------------------------------
def test_addresses_of_one_ipv6_64_are_one_client() -> None:
    t, clock = throttle(free_failures=2, address_failures=10, account_failures=0)
    for n in range(1, 4):  # rotate the interface identifier on every guess
        a = t.admit(f"2001:db8:1:2::{n:x}", ALICE)
        t.failed(a)
        clock.now += a.fail_delay
    assert t.admit("2001:db8:1:2:ffff::1", ALICE).fail_delay == 2.0  # the pair's 4th failure
    assert t.admit("2001:db8:1:3::1", ALICE).fail_delay == 0.0  # another /64: another client
    for n in range(20):
        a = t.admit(f"2001:db8:1:2:{n:x}::1", f"u{n}@example.test")
        if not a.refused_by:
            t.failed(a)
    assert t.admit("2001:db8:1:2::abcd", "x@example.test").refused_by == "address"


# --- bounds ---------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # client
            st.integers(0, 3),  # account
            st.sampled_from(["fail", "ok", "abandon", "keep"]),
            st.floats(0, 5),  # seconds until the next attempt
        ),
        max_size=120,
    )
)
def test_no_attempt_is_ever_held_past_max_delay(
    steps: list[tuple[int, int, str, float]],
) -> None:
    t, clock = throttle(
        free_failures=1, max_delay=6.0, account_failures=4, address_failures=6, window=60.0
    )
    open_attempts: list[Admission] = []
    for client, account, outcome, pause in steps:
        a = t.admit(f"10.4.0.{client}", f"u{account}@example.test", bytes([client, account]))
        if not a.refused_by and not a.repeat:
            assert a.wait >= 0 and a.wait + a.fail_delay <= 6.0
            {"fail": t.failed, "ok": t.succeeded, "abandon": t.abandoned}.get(
                outcome, open_attempts.append
            )(a)
        clock.now += pause
    for a in open_attempts:
        t.failed(a)
        t.failed(a)  # a second settle changes nothing


def test_memory_is_bounded_however_many_keys_come() -> None:
    t, _clock = throttle(max_entries=50, free_failures=0, global_failures=0, known_good_for=1e9)
    for n in range(2000):
        ip = f"10.5.{n // 250}.{n % 250}"
        fail(t, ip, f"u{n}@example.test")
        succeed(t, ip, f"v{n}@example.test")
    tables = [t._pairs, t._known_good, t._account.buckets, t._address.buckets]
    assert all(len(table) <= 50 for table in tables), [len(x) for x in tables]


# --- logging --------------------------------------------------------------------------------
def test_throttling_is_logged_once_per_key_when_it_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "postoffice.auth")
    t, clock = throttle(free_failures=2, account_failures=20, max_delay=30.0)
    for _ in range(8):  # one pair, failing on
        clock.now += fail(t, "192.0.2.1", ALICE).fail_delay
    for n in range(50):  # then a botnet at the same account
        a = t.admit(f"10.6.0.{n}", ALICE)
        if not a.refused_by:
            t.failed(a)
    lines = [r.getMessage() for r in caplog.records if "auth throttle" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "client=192.0.2.1 user=alice@example.test" in lines[0]
    assert "account budget spent user=alice@example.test" in lines[1]


# --- several nodes (a FailureFeed joining two throttles) ----------------------------------
class Wire:
    """Two nodes' feeds joined in memory, as cluster/throttle_feed.py joins them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.boxes: list[list[tuple[str, str, str, float]]] = [[], []]
        self.published: list[str] = []

    def feed(self, node: int) -> Any:
        wire = self

        class Feed:
            def publish(self, event: str, client: str, account: str) -> None:
                wire.published.append(event)
                wire.boxes[1 - node].append((event, client, account, wire.clock()))

            def received(self) -> list[tuple[str, str, str, float]]:
                got, wire.boxes[node] = wire.boxes[node], []
                return got

        return Feed()


def two_nodes(**limits: Any) -> tuple[LoginThrottle, LoginThrottle, Wire]:
    clock = Clock()
    wire = Wire(clock)
    lim = ThrottleLimits(**limits)
    return (
        LoginThrottle(lim, clock=clock, feed=wire.feed(0)),
        LoginThrottle(lim, clock=clock, feed=wire.feed(1)),
        wire,
    )


def test_failures_spread_over_two_nodes_spend_one_budget() -> None:
    a, b, _wire = two_nodes(free_failures=1000, account_failures=6, window=3600.0, max_delay=5.0)
    for _ in range(3):
        fail(a, "192.0.2.1", ALICE)
        fail(b, "192.0.2.2", ALICE)
    assert a.admit("192.0.2.3", ALICE).refused_by == "account"
    assert b.admit("192.0.2.3", ALICE).refused_by == "account"


def test_the_pair_penalty_follows_the_client_to_the_other_node() -> None:
    a, b, _wire = two_nodes(free_failures=3, max_delay=8.0)
    for _ in range(3):
        fail(a, "192.0.2.1", ALICE)
    # The 4th wrong password on node b is slowed as it would be on node a.
    assert b.admit("192.0.2.1", ALICE).fail_delay == 1.0


def test_a_known_good_pair_is_sent_once_and_its_successes_not_at_all() -> None:
    a, _b, wire = two_nodes(known_good_for=100.0)
    for _ in range(5):
        succeed(a, "192.0.2.1", ALICE)
    abandoned = a.admit("192.0.2.1", BOB)
    a.abandoned(abandoned)
    assert wire.published == ["g"]  # the first success only
    fail(a, "192.0.2.1", BOB)
    assert wire.published == ["g", "f"]
    wire.clock.now += 51  # half-way to expiring: refreshed on the others
    succeed(a, "192.0.2.1", ALICE)
    assert wire.published == ["g", "f", "g"]


def test_the_owner_known_good_on_one_node_is_exempt_on_the_other() -> None:
    a, b, _wire = two_nodes(free_failures=1000, account_failures=4, window=3600.0, max_delay=5.0)
    succeed(a, "192.0.2.1", ALICE)  # the owner's address, on node a
    for i in range(4):
        fail(a if i % 2 else b, f"198.51.100.{i}", ALICE)  # an attack, spread
    assert b.admit("198.51.100.9", ALICE).refused_by == "account"
    owner = b.admit("192.0.2.1", ALICE)
    assert owner.refused_by is None and owner.known_good
