"""MX ordering: RFC 5321 §5.1 preference order and shuffling, RFC 7505 null MX."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.dns.mx import MxLoopsToSelf, MxRecord, NullMx, order_mx


def test_lower_preference_first() -> None:
    records = [MxRecord(20, "b.example."), MxRecord(10, "A.example."), MxRecord(30, "c.example")]
    assert order_mx(records, random.Random(1)) == ["a.example", "b.example", "c.example"]


def test_equal_preferences_are_shuffled() -> None:
    records = [MxRecord(10, f"mx{i}.example") for i in range(4)] + [MxRecord(5, "first.example")]
    orders = {tuple(order_mx(records, random.Random(seed))) for seed in range(60)}
    assert len(orders) > 1  # the tie is broken differently from seed to seed
    for order in orders:
        assert order[0] == "first.example"
        assert sorted(order[1:]) == [f"mx{i}.example" for i in range(4)]


def test_no_records_means_implicit_mx() -> None:
    assert order_mx([], random.Random(0)) == []


def test_null_mx_alone_is_refusal() -> None:
    with pytest.raises(NullMx):
        order_mx([MxRecord(0, ".")], random.Random(0))
    with pytest.raises(NullMx):
        order_mx([MxRecord(0, "")], random.Random(0))


def test_null_target_among_real_records_is_ignored() -> None:
    records = [MxRecord(0, "."), MxRecord(10, "mx.example")]
    assert order_mx(records, random.Random(0)) == ["mx.example"]


def test_self_and_less_preferred_hosts_are_dropped() -> None:
    records = [MxRecord(10, "primary.example"), MxRecord(20, "mail.me"), MxRecord(30, "z.example")]
    assert order_mx(records, random.Random(0), self_names=["MAIL.ME."]) == ["primary.example"]
    with pytest.raises(MxLoopsToSelf):
        order_mx(
            [MxRecord(10, "mail.me"), MxRecord(20, "b.example")],
            random.Random(0),
            self_names=["mail.me"],
        )


def test_duplicate_host_tried_once_at_best_preference() -> None:
    records = [MxRecord(30, "a.example"), MxRecord(10, "a.example"), MxRecord(20, "b.example")]
    assert order_mx(records, random.Random(0)) == ["a.example", "b.example"]


@given(
    st.lists(st.tuples(st.integers(0, 65535), st.sampled_from("abcdefg")), min_size=1),
    st.integers(),
)
def test_order_is_by_preference_and_complete(pairs: list[tuple[int, str]], seed: int) -> None:
    records = [MxRecord(p, f"{h}.example") for p, h in pairs]
    best = {}
    for p, h in pairs:
        best[f"{h}.example"] = min(p, best.get(f"{h}.example", p))
    ordered = order_mx(records, random.Random(seed))
    assert sorted(ordered) == sorted(best)
    prefs = [best[h] for h in ordered]
    assert prefs == sorted(prefs)
