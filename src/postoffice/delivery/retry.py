"""When to try again, and when to give up (RFC 5321 §4.5.4.1).

Pure functions of the attempt count and times, so the schedule is tested
without a clock.  RFC 5321 asks for at least 30 minutes between tries and
at least 4-5 days before giving up; the default schedule starts sooner
(greylisting usually clears within minutes) and grows to that.
"""

from __future__ import annotations

from collections.abc import Sequence


def retry_delay(attempts: int, schedule: Sequence[float]) -> float:
    """The wait after the ``attempts``-th failed try; the last delay repeats."""
    if not schedule:
        raise ValueError("empty retry schedule")
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def next_attempt(
    now: float, attempts: int, created: float, schedule: Sequence[float], give_up_after: float
) -> float | None:
    """The time of the next try after a temporary failure at ``now``, or None
    when the message has been queued too long: then it bounces.  The last
    try happens right at the deadline rather than a whole delay past it."""
    deadline = created + give_up_after
    if now >= deadline:
        return None
    return min(now + retry_delay(attempts, schedule), deadline)


def warning_due(now: float, created: float, warn_after: float, already_warned: bool) -> bool:
    """Whether a "delayed" DSN should go out now (0 turns warnings off)."""
    return warn_after > 0 and not already_warned and now - created >= warn_after
