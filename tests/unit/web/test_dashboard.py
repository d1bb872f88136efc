"""web/dashboard.py: hourly counts from cumulative samples, and the bars."""

from __future__ import annotations

from postoffice.web.dashboard import HOURS, PLOT_HEIGHT, TrafficHistory, plot


class Clock:
    def __init__(self) -> None:
        self.now = 100 * 3600.0  # the top of an hour

    def __call__(self) -> float:
        return self.now


def totals(received: float) -> dict[str, float]:
    return {"received": received, "delivered": 0.0, "deferred": 0.0, "bounced": 0.0}


def test_hourly_counts_are_differences_of_the_last_samples() -> None:
    clock = Clock()
    queue = [3]
    history = TrafficHistory(lambda: totals(0), lambda: (queue[0], clock.now - 600), None, clock)
    history.sample(totals(5))  # 5 since the server started, in this hour
    clock.now += 1800
    history.sample(totals(7))
    clock.now += 3600  # the next hour
    queue[0] = 9
    history.sample(totals(10))
    hourly = history.hourly("received")
    assert len(hourly) == HOURS
    assert [v for _h, v in hourly[-2:]] == [7, 3]
    assert all(v == 0 for _h, v in hourly[:-2])
    assert [v for _h, v in history.queue_hourly()[-2:]] == [3, 9]
    assert [v for _h, v in history.queue_age_hourly()[-2:]] == [10, 10]  # minutes
    clock.now += 3600 * (HOURS + 1)  # a day later, nothing sampled since
    assert all(v == 0 for _h, v in history.hourly("received"))


def test_a_counter_reset_never_gives_a_negative_count() -> None:
    clock = Clock()
    history = TrafficHistory(lambda: totals(0), None, None, clock)
    history.sample(totals(50))
    clock.now += 3600
    history.sample(totals(2))
    assert history.hourly("received")[-1][1] == 0


def test_bars_scale_to_the_largest_and_say_their_value() -> None:
    hourly = [(3600 * h, v) for h, v in enumerate([0, 4, 8])]
    drawn = plot("received", hourly)
    assert drawn.top == 8 and drawn.total == 12
    assert [b.height for b in drawn.bars] == [0, (PLOT_HEIGHT - 10) // 2, PLOT_HEIGHT - 10]
    assert all(b.y + b.height == PLOT_HEIGHT for b in drawn.bars)
    assert drawn.bars[2].label.endswith("received: 8")
    assert plot("bounced", [(0, 0)]).top == 1  # an empty plot still has a scale
