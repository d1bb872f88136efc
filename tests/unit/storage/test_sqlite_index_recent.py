"""SqliteImapIndex schema 3: \\Recent claims (RFC 3501 §2.3.2), the first UID
of each folder no session has been told about, and the upgrade from
schema 2 that shows no old mail as recent."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from pathlib import Path

from postoffice.storage.imap_index import NewMessage, RecentUids
from postoffice.storage.sqlite_index import SqliteImapIndex

_names = itertools.count()


def add(index: SqliteImapIndex, folder: str, count: int) -> tuple[int, ...]:
    """``count`` new messages (APPEND), each with a name of its own."""
    return index.append(
        folder,
        [NewMessage(f"m{next(_names)}:2,", frozenset(), 1_700_000_000, 10) for _ in range(count)],
    )


def test_each_uid_is_claimed_once(index: SqliteImapIndex) -> None:
    index.create_folder("Box")
    uids = add(index, "Box", 3)
    below = max(uids) + 1
    assert index.first_recent("Box") == 1
    assert index.recent_count("Box") == 3
    assert index.claim_recent("Box", below) == 1  # this session holds 1..3
    assert index.claim_recent("Box", below) == below  # the next holds none
    assert index.recent_count("Box") == 0
    (new,) = add(index, "Box", 1)
    assert index.recent_count("Box") == 1
    assert index.claim_recent("Box", new + 1) == new
    assert index.recent_count("Box", 1, new) == 3  # a range of UIDs, counted


def test_a_claim_stops_at_the_claimers_uidnext(index: SqliteImapIndex) -> None:
    index.create_folder("Box")
    uids = add(index, "Box", 4)
    # A session that knew of only two messages claims only those.
    assert index.claim_recent("Box", uids[2]) == 1
    assert index.first_recent("Box") == uids[2]
    assert index.claim_recent("Box", max(uids) + 1) == uids[2]


def test_concurrent_claims_split_the_uids(index: SqliteImapIndex) -> None:
    index.create_folder("Box")
    below = max(add(index, "Box", 50)) + 1
    got: list[int] = []

    def claim() -> None:
        got.append(index.claim_recent("Box", below))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1] + [below] * 7


def test_a_deleted_and_recreated_folder_starts_all_recent(index: SqliteImapIndex) -> None:
    index.create_folder("Box")
    add(index, "Box", 2)
    index.claim_recent("Box", 3)
    index.delete_folder("Box")
    index.create_folder("Box")
    assert index.first_recent("Box") == 1


def test_a_schema_2_index_shows_no_old_mail_as_recent(path: Path) -> None:
    idx = SqliteImapIndex(path)
    idx.create_folder("Box")
    add(idx, "Box", 2)
    idx._conn.executescript("DROP TABLE recent; PRAGMA user_version = 2;")
    idx.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()
    idx = SqliteImapIndex(path)
    try:
        assert idx.recent_count("Box") == 0
        assert idx.first_recent("Box") == 3
        (new,) = add(idx, "Box", 1)
        assert idx.claim_recent("Box", new + 1) == new
    finally:
        idx.close()


def test_recent_runs_merge_and_answer_membership() -> None:
    held = RecentUids()
    assert not held and 1 not in held
    held.add(5, 5)  # an empty claim
    assert not held
    held.add(3, 6)
    held.add(6, 8)  # the next run: merged
    held.add(10, 11)
    assert held.runs == [(3, 8), (10, 11)]
    assert [u for u in range(12) if u in held] == [3, 4, 5, 6, 7, 10]
