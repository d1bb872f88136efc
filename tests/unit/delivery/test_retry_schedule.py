"""Retry timing (RFC 5321 §4.5.4.1): growing delays, the last repeating, a deadline."""

from __future__ import annotations

import pytest

from postoffice.delivery.retry import next_attempt, retry_delay, warning_due

SCHEDULE = (60.0, 300.0, 900.0)


def test_delays_grow_then_the_last_repeats() -> None:
    assert [retry_delay(n, SCHEDULE) for n in range(1, 6)] == [60, 300, 900, 900, 900]


def test_empty_schedule_is_refused() -> None:
    with pytest.raises(ValueError):
        retry_delay(1, ())


def test_next_attempt_before_the_deadline() -> None:
    assert next_attempt(1000.0, 1, 1000.0, SCHEDULE, 86400) == 1060.0
    assert next_attempt(1000.0, 3, 0.0, SCHEDULE, 86400) == 1900.0


def test_last_try_is_at_the_deadline_and_then_it_gives_up() -> None:
    created = 0.0
    assert next_attempt(950.0, 3, created, SCHEDULE, 1000.0) == 1000.0
    assert next_attempt(1000.0, 4, created, SCHEDULE, 1000.0) is None


def test_warning_once_after_warn_after_unless_off() -> None:
    assert not warning_due(100.0, 0.0, 200.0, False)
    assert warning_due(200.0, 0.0, 200.0, False)
    assert not warning_due(300.0, 0.0, 200.0, True)
    assert not warning_due(10**9, 0.0, 0.0, False)
