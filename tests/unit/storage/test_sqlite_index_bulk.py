"""SqliteImapIndex on a first sync of a big folder (the cold SELECT): the
stem index dropped and built again in the sync's transaction, the records
of ``SyncResult.added`` made on demand, the arrival sort, and the \\Recent
count answered from the folder's kept count."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.storage.imap_index import FileFacts, MessageRecord, NewMessage
from postoffice.storage.maildir import arrival_key, arrival_order
from postoffice.storage.sqlite_index import BULK_ROWS, SqliteImapIndex
from tests.unit.storage.index_support import ListedFiles, stem


def stem_index_sql(path: Path) -> str | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'messages_stem'"
        ).fetchone()
        return None if row is None else str(row[0])
    finally:
        conn.close()


def test_a_first_big_sync_keeps_order_and_the_stem_index(
    index: SqliteImapIndex, path: Path, tmp_path: Path
) -> None:
    fresh = SqliteImapIndex(tmp_path / "fresh.sqlite3")
    fresh.close()
    schema_sql = stem_index_sql(tmp_path / "fresh.sqlite3")
    assert schema_sql is not None and "UNIQUE" in schema_sql
    count = BULK_ROWS + 17
    names = [stem(n) for n in range(count)][::-1]  # listed in reverse
    names[5] += ":2,S"  # one seen, in cur/
    files = ListedFiles(names)
    result = index.sync("INBOX", files)
    assert len(result.added) == count and result.folder.messages == count
    assert [r.uid for r in result.added] == list(range(1, count + 1))
    assert [r.stem for r in result.added] == [stem(n) for n in range(count)]
    seen = [r for r in result.added if r.flags]
    assert [(r.stem, r.info, r.flags) for r in seen] == [(stem(count - 6), "S", {"\\Seen"})]
    assert isinstance(result.added[-1], MessageRecord) and result.added[-1].size == 100 + count - 1
    assert [r.uid for r in result.added[2:4]] == [3, 4]
    # The stem index is back, as the schema made it, and still unique.
    assert stem_index_sql(path) == schema_sql
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO messages (folder, uid, stem, info, flags, modseq, internaldate, size)"
                " SELECT folder, 999999, stem, '', '', 1, 0, 0 FROM messages LIMIT 1"
            )
        plan = " ".join(
            str(r)
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT uid FROM messages WHERE folder = 1 AND stem = 'x'"
            )
        )
        assert "messages_stem" in plan
    finally:
        conn.close()
    # Lookups by stem work after it: an APPEND of a file the sync numbered
    # keeps its UID; a file gone is expunged by its UID.
    assert index.append("INBOX", [NewMessage(stem(7), frozenset(), 1, 107)]) == (8,)
    files.remove(stem(3))
    again = index.sync("INBOX", files)
    assert again.expunged == (4,) and again.folder.messages == count - 1
    assert index.first_unseen("INBOX", again.folder.uidnext) == 1
    assert index.recent_count("INBOX") == count - 1


class FailingFiles(ListedFiles):
    """Fails while the new files' facts are read, after some were."""

    def __init__(self, names: list[str], after: int) -> None:
        super().__init__(names)
        self.left = after

    def facts(self, name: str) -> FileFacts | None:
        self.left -= 1
        if self.left < 0:
            raise OSError("disk gone")
        return super().facts(name)


def test_a_failed_big_sync_leaves_the_index_as_it_was(index: SqliteImapIndex, path: Path) -> None:
    # Enough to take the bulk path: the failure comes after the listing,
    # before the insert; a failing insert would roll back the dropped index
    # the same way (one transaction).
    names = [stem(n) for n in range(BULK_ROWS + 1)]
    index.create_folder("INBOX")
    before = stem_index_sql(path)
    with pytest.raises(OSError):
        index.sync("INBOX", FailingFiles(names, BULK_ROWS // 2))
    assert stem_index_sql(path) == before
    state = index.folder("INBOX")
    assert state is not None and state.uidnext == 1 and state.messages == 0
    assert index.sync("INBOX", ListedFiles(names)).folder.uidnext == len(names) + 1


def test_recent_count_from_either_side(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(n) for n in range(50)])
    index.sync("INBOX", files)
    for gone in (3, 20, 40):
        files.remove(stem(gone))
    index.sync("INBOX", files)
    uids = index.uids("INBOX")
    uidnext = 51
    for first in (1, 2, 5, 21, 30, 45, 50, 51, 60):
        for below in (10, 25, 50, uidnext, 2**32):
            want = sum(1 for u in uids if first <= u < below)
            assert index.recent_count("INBOX", first, below) == want, (first, below)
    assert index.recent_count("INBOX") == 47


names_st = st.lists(
    st.one_of(
        st.builds(
            "{}.M{}P{}".format,
            st.integers(0, 10**19),
            st.integers(0, 10**10),
            st.integers(0, 99),
        ),
        st.text(alphabet="0123456789.MPx,S=", max_size=20),
    ),
    max_size=30,
)


@given(names_st)
def test_arrival_order_is_the_arrival_key_order(names: list[str]) -> None:
    assert arrival_order(names) == sorted(names, key=arrival_key)


def test_added_compares_as_the_tuple_it_stands_for(index: SqliteImapIndex) -> None:
    result = index.sync("INBOX", ListedFiles([stem(1), stem(2)]))
    assert result.added == tuple(result.added) and result.added != ()
    assert [r.uid for r in result.added] == [1, 2]
    assert index.sync("INBOX", ListedFiles([stem(1), stem(2)])).added == ()
