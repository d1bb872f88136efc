"""The shared throttle's wire format (cluster/throttle_feed.py): payloads stay
under PostgreSQL's NOTIFY limit however many failures are batched, and
anything malformed that arrives is skipped, never raised."""

from __future__ import annotations

import json

from postoffice.cluster.throttle_feed import MAX_FIELD, MAX_PAYLOAD, decode, encode


def test_a_batch_round_trips_in_payloads_under_the_limit() -> None:
    failures = [("f", f"192.0.2.{i % 250}", f"user{i}@example.test") for i in range(2000)]
    payloads = encode(failures)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    assert [f for p in payloads for f in decode(p)] == failures


def test_names_longer_than_the_bound_are_not_sent() -> None:
    assert encode([("f", "192.0.2.1", "x" * (MAX_FIELD + 1))]) == []
    assert decode(encode([("g", "192.0.2.1", "ünïcode@example.test")])[0]) == [
        ("g", "192.0.2.1", "ünïcode@example.test")
    ]


def test_malformed_payloads_are_skipped() -> None:
    bad = ("", "{", "{}", "[1]", '[["f", "a"]]', '[["f", "a", 2]]', '[["x", "a", "b"]]')
    for payload in (*bad, json.dumps([["f", "a", "b", "c"]])):
        assert decode(payload) == []
    assert decode('[["f", "a", "b"], 7, ["g", "c", "d"]]') == [("f", "a", "b"), ("g", "c", "d")]
