"""SqliteImapIndex: every operation, sync against a changing Maildir, durability,
corruption, and the speed of a sync with nothing to do."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

import pytest

from postoffice.storage.imap_index import (
    FileFacts,
    FolderExists,
    FolderState,
    ImapIndex,
    ImapIndexError,
    NewMessage,
    NoSuchFolder,
    StoreMode,
)
from postoffice.storage.index_files import MaildirFolderFiles
from postoffice.storage.maildir import arrival_key
from postoffice.storage.sqlite_index import INDEX_NAME, SqliteImapIndex
from tests.unit.storage.index_support import ListedFiles, stem

SEEN, FLAGGED, DELETED, ANSWERED = "\\Seen", "\\Flagged", "\\Deleted", "\\Answered"


def state(index: ImapIndex, name: str) -> FolderState:
    found = index.folder(name)
    assert found is not None
    return found


def test_is_an_imap_index(index: SqliteImapIndex) -> None:
    checked: ImapIndex = index
    assert checked.folders() == []


def test_file_is_private_and_named_for_maildir_tools(path: Path, index: SqliteImapIndex) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # No leading ".": a Maildir++ reader would take it for a folder.
    assert not INDEX_NAME.startswith(".")
    assert SqliteImapIndex.for_maildir(path.parent).path == path


# --- folders -------------------------------------------------------------------------
def test_create_folder_state(index: SqliteImapIndex) -> None:
    before = int(time.time())
    inbox = index.create_folder("INBOX")
    assert inbox.uidnext == 1 and inbox.highestmodseq == 1
    assert before <= inbox.uidvalidity < 2**32
    assert index.folder("INBOX") == inbox
    assert index.folder("Nope") is None
    with pytest.raises(FolderExists):
        index.create_folder("INBOX")
    assert index.ensure_folder("INBOX") == inbox


def test_uidvalidity_differs_for_every_creation(index: SqliteImapIndex) -> None:
    seen = {index.create_folder("A").uidvalidity, index.create_folder("B").uidvalidity}
    for _ in range(3):
        index.delete_folder("A")
        seen.add(index.create_folder("A").uidvalidity)
    assert len(seen) == 5


def test_recreated_folder_starts_afresh(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2)])
    first = index.sync("Work", files).folder
    index.expunge("Work", [1])
    index.delete_folder("Work")
    again = index.sync("Work", ListedFiles([stem(3)]))
    assert again.folder.uidvalidity > first.uidvalidity
    assert [r.uid for r in again.added] == [1]  # a new UIDVALIDITY: UIDs may start over
    assert index.vanished_since("Work", 0) == []


def test_rename_keeps_uidvalidity_and_uids(index: SqliteImapIndex) -> None:
    before = index.sync("Old", ListedFiles([stem(1), stem(2)])).folder
    index.subscribe("Old")
    after = index.rename_folder("Old", "New")
    assert (after.name, after.uidvalidity, after.uidnext) == ("New", before.uidvalidity, 3)
    assert index.folder("Old") is None
    assert index.uids("New") == [1, 2]
    assert index.sync("New", ListedFiles([stem(1), stem(2)])).changed is False
    index.create_folder("Other")
    with pytest.raises(FolderExists):
        index.rename_folder("New", "Other")
    with pytest.raises(NoSuchFolder):
        index.rename_folder("Old", "X")


def test_folders_listed_by_name(index: SqliteImapIndex) -> None:
    for name in ("b", "INBOX", "a"):
        index.create_folder(name)
    assert [f.name for f in index.folders()] == ["INBOX", "a", "b"]
    with pytest.raises(NoSuchFolder):
        index.delete_folder("c")


def test_operations_on_a_missing_folder(index: SqliteImapIndex) -> None:
    with pytest.raises(NoSuchFolder):
        index.uids("INBOX")
    with pytest.raises(NoSuchFolder):
        index.store("INBOX", [1], StoreMode.ADD, [SEEN])
    with pytest.raises(NoSuchFolder):
        index.append("INBOX", [])


# --- sync ------------------------------------------------------------------------------
def test_sync_assigns_uids_in_delivery_order(index: SqliteImapIndex) -> None:
    # Listed out of order; 1700000000.M9 and .M10 also sort wrongly as text.
    names = [stem(10), stem(9), stem(2_000_000), stem(1)]
    result = index.sync("INBOX", ListedFiles(names))
    assert [r.stem for r in result.added] == sorted(names, key=arrival_key)
    assert [r.uid for r in result.added] == [1, 2, 3, 4]
    assert result.folder.uidnext == 5
    assert result.folder.highestmodseq == 2
    assert {r.modseq for r in result.added} == {2}
    assert result.added[0].size == 101 and result.added[0].internaldate == 1_700_000_000
    assert result.expunged == () and result.flags_changed == ()


def test_sync_with_nothing_changed_changes_nothing(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2) + ":2,S"])
    first = index.sync("INBOX", files)
    again = index.sync("INBOX", files)
    assert not again.changed
    assert again.folder == first.folder


def test_sync_reads_flags_from_info(index: SqliteImapIndex) -> None:
    result = index.sync("INBOX", ListedFiles([stem(1) + ":2,FRSab", stem(2)]))
    one, two = result.added
    assert one.flags == {SEEN, FLAGGED, ANSWERED, "$Forwarded", "Work"}
    assert one.info == "FRSab"
    assert two.flags == frozenset() and two.info == ""


def test_sync_new_to_cur_keeps_uid_and_modseq(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1)])
    index.sync("INBOX", files)
    files.rename(stem(1), "")  # new/x -> cur/x:2, (no flags): same flags
    result = index.sync("INBOX", files)
    assert not result.changed
    assert result.folder.highestmodseq == 2
    [record] = index.messages("INBOX")
    assert (record.uid, record.info) == (1, "")


def test_sync_picks_up_flag_changes_of_other_tools(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2)])
    index.sync("INBOX", files)
    files.rename(stem(2), "FS")
    result = index.sync("INBOX", files)
    [changed] = result.flags_changed
    assert (changed.uid, changed.flags, changed.modseq) == (2, frozenset({SEEN, FLAGGED}), 3)
    assert result.folder.highestmodseq == 3
    assert [r.uid for r in index.changed_since("INBOX", 2)] == [2]
    files.rename(stem(2), "S")
    result = index.sync("INBOX", files)
    assert result.flags_changed[0].flags == {SEEN}


def test_sync_keeps_flags_no_letter_carries(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1)])
    index.sync("INBOX", files)
    index.store("INBOX", [1], StoreMode.ADD, ["NoLetter", SEEN])
    files.rename(stem(1), "S")  # our own rename after the STORE
    assert not index.sync("INBOX", files).changed
    files.rename(stem(1), "FS")  # then another tool flags it
    [changed] = index.sync("INBOX", files).flags_changed
    assert changed.flags == {"NoLetter", SEEN, FLAGGED}


def test_sync_records_removed_files_as_expunged(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2), stem(3)])
    index.sync("INBOX", files)
    files.remove(stem(2))
    result = index.sync("INBOX", files)
    assert result.expunged == (2,)
    assert result.folder.highestmodseq == 3
    assert index.uids("INBOX") == [1, 3]
    assert index.vanished_since("INBOX", 2) == [2]
    assert index.vanished_since("INBOX", 3) == []


def test_sync_does_not_expunge_what_a_listing_missed(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2)])
    index.sync("INBOX", files)
    files.missed.add(stem(2))  # renamed while readdir ran: not listed, still there
    result = index.sync("INBOX", files)
    assert not result.changed
    assert index.uids("INBOX") == [1, 2]


def test_sync_adds_removes_and_renames_at_once(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2), stem(3)])
    index.sync("INBOX", files)
    files.remove(stem(1))
    files.rename(stem(2), "T")
    files.deliver(stem(4))
    result = index.sync("INBOX", files)
    assert result.expunged == (1,)
    assert [(r.uid, r.flags) for r in result.flags_changed] == [(2, frozenset({DELETED}))]
    assert [(r.uid, r.stem) for r in result.added] == [(4, stem(4))]
    assert {r.modseq for r in (*result.added, *result.flags_changed)} == {3}


def test_sync_never_reuses_a_uid(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2)])
    index.sync("INBOX", files)
    files.remove(stem(2))
    index.sync("INBOX", files)
    files.deliver(stem(2))  # the same file back (a restore): a new message
    result = index.sync("INBOX", files)
    assert [r.uid for r in result.added] == [3]


def test_sync_skips_a_file_gone_before_its_facts(index: SqliteImapIndex) -> None:
    class Vanishing(ListedFiles):
        def facts(self, name: str) -> None:
            return None

    result = index.sync("INBOX", Vanishing([stem(1)]))
    assert not result.changed
    assert result.folder.uidnext == 1 and result.folder.highestmodseq == 1


# --- APPEND, COPY, MOVE ----------------------------------------------------------------
def test_append_allocates_uids(index: SqliteImapIndex) -> None:
    index.create_folder("INBOX")
    uids = index.append(
        "INBOX",
        [
            NewMessage(stem(1) + ":2,S", frozenset({"\\SEEN", "Work"}), 1_600_000_000, 10),
            NewMessage(stem(2), frozenset(), 1_600_000_001, 20),
        ],
    )
    assert uids == (1, 2)
    one, two = index.messages("INBOX")
    assert one.flags == {SEEN, "Work"} and one.info == "S"
    assert (one.internaldate, one.size, one.modseq) == (1_600_000_000, 10, 2)
    assert two.stem == stem(2)
    # A sync afterwards finds nothing new (the files are the ones appended).
    assert not index.sync("INBOX", ListedFiles([stem(1) + ":2,S", stem(2)])).changed


def test_append_after_a_sync_found_the_file_keeps_its_uid(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1)]))
    assert index.append("INBOX", [NewMessage(stem(1), frozenset({SEEN}), 5, 101)]) == (1,)
    [record] = index.messages("INBOX")
    assert record.flags == {SEEN} and record.internaldate == 5
    assert state(index, "INBOX").uidnext == 2


def test_copy_keeps_flags_and_date_with_new_uids(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1) + ":2,S", stem(2), stem(3)]))
    index.store("INBOX", [2], StoreMode.ADD, ["Work"])
    target = index.sync("Archive", ListedFiles([stem(50)])).folder
    result = index.copy("INBOX", "Archive", [(1, stem(101) + ":2,S"), (2, stem(102)), (9, "x")])
    assert result.uidvalidity == target.uidvalidity
    assert result.pairs == ((1, 2), (2, 3))
    assert result.expunged == ()
    copied = index.messages("Archive", 2)
    assert [(r.stem, r.flags) for r in copied] == [
        (stem(101), frozenset({SEEN})),
        (stem(102), frozenset({"Work"})),
    ]
    assert copied[0].internaldate == 1_700_000_000
    assert index.uids("INBOX") == [1, 2, 3]


def test_move_expunges_the_source(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1), stem(2) + ":2,F"]))
    index.create_folder("Trash")
    source_before = state(index, "INBOX")
    result = index.move("INBOX", "Trash", [(2, stem(2) + ":2,F")])
    assert result.pairs == ((2, 1),)
    assert result.expunged == (2,)
    assert index.uids("INBOX") == [1]
    assert index.vanished_since("INBOX", source_before.highestmodseq) == [2]
    [moved] = index.messages("Trash")
    assert moved.flags == {FLAGGED} and moved.stem == stem(2)
    with pytest.raises(ImapIndexError):
        index.move("Trash", "Trash", [(1, stem(2))])


# --- STORE, EXPUNGE ---------------------------------------------------------------------
def test_store_modes(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1), stem(2)]))
    added = index.store("INBOX", [1, 2], StoreMode.ADD, ["\\seen"])
    assert added.modseq == 3 and [r.flags for r in added.changed] == [{SEEN}, {SEEN}]
    replaced = index.store("INBOX", [1], StoreMode.REPLACE, [FLAGGED, "Work"])
    assert replaced.modseq == 4 and replaced.changed[0].flags == {FLAGGED, "Work"}
    removed = index.store("INBOX", [1, 2], StoreMode.REMOVE, ["work", SEEN])
    # Keywords are kept as given: "work" is not "Work" here (the parser normalises).
    assert [(r.uid, r.flags) for r in removed.changed] == [(2, frozenset())]
    assert state(index, "INBOX").highestmodseq == 5


def test_store_that_changes_nothing_keeps_the_modseq(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1) + ":2,S"]))
    result = index.store("INBOX", [1, 7], StoreMode.ADD, [SEEN])
    assert result.changed == () and result.modseq == 2


def test_store_unchangedsince(index: SqliteImapIndex) -> None:
    # RFC 7162 §3.1.3: messages changed after UNCHANGEDSINCE are not
    # updated and come back in MODIFIED; the others are.
    index.sync("INBOX", ListedFiles([stem(1), stem(2), stem(3)]))  # all at modseq 2
    index.store("INBOX", [2], StoreMode.ADD, [FLAGGED])  # 2 -> modseq 3
    result = index.store("INBOX", [1, 2, 3], StoreMode.ADD, [SEEN], unchanged_since=2)
    assert result.modified == (2,)
    assert [r.uid for r in result.changed] == [1, 3]
    assert result.modseq == 4
    assert index.messages("INBOX", 2, 2)[0].flags == {FLAGGED}
    zero = index.store("INBOX", [1], StoreMode.ADD, [DELETED], unchanged_since=0)
    assert zero.modified == (1,) and zero.changed == ()


def test_note_info_changes_no_modseq(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1)])
    index.sync("INBOX", files)
    index.store("INBOX", [1], StoreMode.ADD, [SEEN])
    index.note_info("INBOX", 1, "S")
    assert index.messages("INBOX")[0].info == "S"
    assert state(index, "INBOX").highestmodseq == 3


def test_expunge(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1), stem(2), stem(3)]))
    result = index.expunge("INBOX", [3, 1, 99])
    assert result == type(result)(modseq=3, expunged=(1, 3))
    assert index.expunge("INBOX", [1]).expunged == ()
    assert index.uids("INBOX") == [2]
    assert index.vanished_since("INBOX", 1) == [1, 3]


def test_queries(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(n) for n in range(1, 6)]))
    index.store("INBOX", [4], StoreMode.ADD, [SEEN])
    assert index.uids("INBOX", 2, 4) == [2, 3, 4]
    assert [r.uid for r in index.messages("INBOX", 4)] == [4, 5]
    assert [r.uid for r in index.changed_since("INBOX", 2)] == [4]
    assert len(index.changed_since("INBOX", 0)) == 5


# --- subscriptions ----------------------------------------------------------------------
def test_subscriptions(index: SqliteImapIndex) -> None:
    index.subscribe("Work")
    index.subscribe("Work")
    index.subscribe("Does/Not/Exist")  # RFC 9051 §6.3.7 allows it
    assert index.subscriptions() == ["Does/Not/Exist", "Work"]
    index.unsubscribe("Work")
    index.unsubscribe("Never")
    assert index.subscriptions() == ["Does/Not/Exist"]


# --- durability and corruption --------------------------------------------------------------
def test_state_survives_reopening(path: Path) -> None:
    first = SqliteImapIndex(path)
    files = ListedFiles([stem(1), stem(2)])
    state = first.sync("INBOX", files).folder
    files.remove(stem(2))
    first.expunge("INBOX", [2])
    first.subscribe("INBOX")
    first.close()
    second = SqliteImapIndex(path)
    try:
        assert second.folder("INBOX") == type(state)("INBOX", state.uidvalidity, 3, 3, 1)
        assert second.subscriptions() == ["INBOX"]
        files.deliver(stem(3))
        assert [r.uid for r in second.sync("INBOX", files).added] == [3]
    finally:
        second.close()


def test_two_connections_see_each_other(path: Path) -> None:
    one, two = SqliteImapIndex(path), SqliteImapIndex(path)
    try:
        one.sync("INBOX", ListedFiles([stem(1)]))
        assert two.append("INBOX", [NewMessage(stem(2), frozenset(), 0, 1)]) == (2,)
        assert one.uids("INBOX") == [1, 2]
    finally:
        one.close()
        two.close()


def test_corrupt_index_is_rebuilt_with_a_new_uidvalidity(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = SqliteImapIndex(path)
    # A UIDVALIDITY ahead of the clock (several creations in one second):
    # the rebuilt index must still go above it.
    for n in range(5):
        first.create_folder(f"F{n}")
    old = first.sync("INBOX", ListedFiles([stem(1)])).folder.uidvalidity
    first.close()
    for suffix in ("-wal", "-shm"):
        (path.parent / (path.name + suffix)).unlink(missing_ok=True)
    data = bytearray(path.read_bytes())
    data[:16] = b"not a database!!"
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="postoffice.imap_index"):
        rebuilt = SqliteImapIndex(path)
    try:
        assert "corrupt" in caplog.text
        assert any(p.name.startswith(INDEX_NAME + ".corrupt-") for p in path.parent.iterdir())
        assert rebuilt.folders() == []
        new = rebuilt.sync("INBOX", ListedFiles([stem(1)])).folder
        assert new.uidvalidity != old
    finally:
        rebuilt.close()


def test_corruption_found_in_use_rebuilds_and_says_so(path: Path) -> None:
    from postoffice.storage.imap_index import IndexCorrupt

    index = SqliteImapIndex(path)
    try:
        index.sync("INBOX", ListedFiles([stem(n) for n in range(1, 2000)]))
        index._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = path.stat().st_size
        with open(path, "r+b") as fh:  # scribble over every page but the first
            fh.seek(4096)
            fh.write(os.urandom(size - 4096))
        index._conn.close()
        index._conn = index._connect()
        with pytest.raises(IndexCorrupt):
            index.sync("INBOX", ListedFiles([stem(1)]))
        assert index.folders() == []  # rebuilt: the next sync starts afresh
    finally:
        index.close()


def test_newer_schema_is_refused(path: Path) -> None:
    SqliteImapIndex(path).close()
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ImapIndexError, match="schema version 99"):
        SqliteImapIndex(path)


# --- MaildirFolderFiles ----------------------------------------------------------------------
def test_maildir_folder_files(tmp_path: Path, index: SqliteImapIndex) -> None:
    for sub in ("tmp", "new", "cur"):
        (tmp_path / sub).mkdir()
    plain = "1700000000.M2P42.host"  # no ",S=": size and date from a stat
    (tmp_path / "new" / plain).write_bytes(b"x" * 7)
    # With ",S=" (stem() writes S=101): the size is the name's, the date is
    # left to be read when first needed (0).
    (tmp_path / "cur" / (stem(1) + ":2,Sa")).write_bytes(b"y" * 3)
    (tmp_path / "cur" / ".hidden").write_bytes(b"")
    os.utime(tmp_path / "new" / plain, (1_500_000_000, 1_500_000_000))
    files = MaildirFolderFiles(tmp_path, keywords={"a": "Work"})
    assert sorted(files.names()) == sorted([plain, stem(1) + ":2,Sa"])
    assert files.facts(plain) == FileFacts(7, 1_500_000_000)
    assert files.facts(stem(1) + ":2,Sa") == FileFacts(101, 0)
    assert files.facts("missing") is None
    assert list(files.gone([stem(1), "other"])) == ["other"]
    result = index.sync("INBOX", files)
    assert [(r.uid, r.flags, r.size, r.internaldate) for r in result.added] == [
        (1, {SEEN, "Work"}, 101, 0),
        (2, frozenset(), 7, 1_500_000_000),
    ]
    os.rename(tmp_path / "new" / plain, tmp_path / "cur" / (plain + ":2,T"))
    assert index.sync("INBOX", files).flags_changed[0].flags == {DELETED}
    index.note_dates("INBOX", [(1, 1_600_000_000)])
    assert [r.internaldate for r in index.messages("INBOX")] == [1_600_000_000, 1_500_000_000]


# --- speed -----------------------------------------------------------------------------------
def test_sync_of_100k_unchanged_is_fast(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(n) + ":2,S" for n in range(100_000)])
    started = time.perf_counter()
    assert len(index.sync("INBOX", files).added) == 100_000
    first = time.perf_counter() - started
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        assert not index.sync("INBOX", files).changed
        timings.append(time.perf_counter() - started)
    print(f"\nsync 100k: first {first:.2f} s, unchanged {min(timings) * 1000:.0f} ms")
    assert min(timings) < 1.0  # about 0.1 s measured; generous for a busy machine


def test_sync_finds_a_new_file_in_cur_with_empty_info(index: SqliteImapIndex) -> None:
    # Found by the state machine: "<stem>:2," (cur/, no flags) was never indexed.
    result = index.sync("INBOX", ListedFiles([stem(1) + ":2,"]))
    assert [(r.uid, r.info) for r in result.added] == [(1, "")]
