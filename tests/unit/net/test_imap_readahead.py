"""ReadAhead: only a client going through the view in order gets messages read ahead."""

from __future__ import annotations

from postoffice.net.imap_readahead import MAX_BYTES, MAX_MESSAGES, ReadAhead
from postoffice.protocol.imap_fetch import FetchMessage
from postoffice.storage.imap_index import MessageRecord

UIDS = [1, 2, 3, 5, 8, *range(10, 60)]


def _records(size: int = 100) -> dict[int, MessageRecord]:
    return {u: MessageRecord(u, f"s{u}", "", frozenset(), 1, 0, size) for u in UIDS}


def test_the_first_fetch_reads_nothing_ahead_the_next_in_order_does() -> None:
    ahead, records = ReadAhead(), _records()
    assert ahead.take(1, UIDS) is None
    assert ahead.plan(1, UIDS, records, set()) == []
    assert ahead.take(2, UIDS) is None
    along = ahead.plan(2, UIDS, records, set())
    assert [r.uid for r in along] == UIDS[2 : 2 + MAX_MESSAGES]
    ahead.keep({r.uid: FetchMessage(b"m%d\n" % r.uid) for r in along})
    for uid in (3, 5, 8):  # served from what was read, in order
        held = ahead.take(uid, UIDS)
        assert held is not None and held.wire == b"m%d\r\n" % uid
    assert ahead.take(3, UIDS) is None  # handed out once


def test_out_of_order_and_clear_read_nothing_ahead() -> None:
    ahead, records = ReadAhead(), _records()
    ahead.plan(10, UIDS, records, set())
    assert ahead.plan(20, UIDS, records, set()) == []  # not the one after 10
    ahead.plan(30, UIDS, records, set())
    ahead.clear()
    assert ahead.plan(31, UIDS, records, set()) == []


def test_bounded_by_bytes_and_skipping_ghosts_and_gone() -> None:
    ahead, records = ReadAhead(), _records(size=MAX_BYTES // 3)
    ahead.plan(1, UIDS, records, set())
    assert [r.uid for r in ahead.plan(2, UIDS, records, set())] == [3, 5, 8]
    ahead, records = ReadAhead(), _records()
    ahead.plan(1, UIDS, records, set())
    along = ahead.plan(2, UIDS, records, {3})
    assert along[0].uid == 5
    ahead.keep({5: None, 8: FetchMessage(b"x\n")})
    assert ahead.take(5, UIDS) is None and ahead.take(8, UIDS) is not None
