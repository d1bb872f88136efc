"""SqliteImapIndex schema 2: the message count, the listing token that lets
a sync skip reading an unchanged folder, STATUS and first-unseen counted in
SQLite, the FETCH structure cache, the upgrade from schema 1, and one shared
index per mailbox per process."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from postoffice.storage import sqlite_index
from postoffice.storage.imap_index import StoreMode, Structure
from postoffice.storage.index_files import TRUSTED_AFTER, MaildirFolderFiles
from postoffice.storage.sqlite_index import INDEX_NAME, SqliteImapIndex
from tests.unit.storage.index_support import ListedFiles, stem

SEEN, DELETED = "\\Seen", "\\Deleted"


class CountingFiles(ListedFiles):
    """ListedFiles that counts how often the folder is listed."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.listings = 0

    def names(self) -> list[str]:
        self.listings += 1
        return super().names()


def structure(uid: int) -> Structure:
    return Structure(uid, 100 + uid, b"(NIL)", b'("TEXT" "PLAIN")', b'("TEXT")')


# --- the count and the listing token ------------------------------------------------
def test_count_follows_every_change(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2), stem(3)])
    assert index.sync("INBOX", files).folder.messages == 3
    index.expunge("INBOX", [2])
    files.remove(stem(2))
    assert [s.messages for s in index.folders()] == [2]
    index.create_folder("Archive")
    index.move("INBOX", "Archive", [(1, f"{stem(9)}:2,S")])
    files.remove(stem(1))
    assert [(s.name, s.messages) for s in index.folders()] == [("Archive", 1), ("INBOX", 1)]
    files.deliver(stem(4))
    assert index.sync("INBOX", files).folder.messages == 2


def test_unchanged_token_skips_the_listing(index: SqliteImapIndex) -> None:
    files = CountingFiles([stem(1), stem(2)])
    index.sync("INBOX", files)
    listed = files.listings
    again = index.sync("INBOX", files)
    assert files.listings == listed  # nothing read: the token is the same
    assert again.folder.messages == 2 and not again.changed
    files.deliver(stem(3))  # moves the token, as a delivery moves new/'s mtime
    result = index.sync("INBOX", files)
    assert files.listings == listed + 1
    assert [r.uid for r in result.added] == [3]


class UntrustedFiles(CountingFiles):
    def listing(self) -> str:
        return ""


def test_an_untrusted_token_always_lists(index: SqliteImapIndex) -> None:
    files = UntrustedFiles([stem(1)])
    index.sync("INBOX", files)
    index.sync("INBOX", files)
    assert files.listings == 2


def test_maildir_token_is_withheld_while_the_directories_are_fresh(tmp_path: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    files = MaildirFolderFiles(tmp_path)
    # Just made: a change in the same clock tick would not move the mtime.
    assert files.listing() == ""
    old = time.time() - TRUSTED_AFTER - 5
    for sub in ("new", "cur"):
        os.utime(tmp_path / sub, (old, old))
    token = files.listing()
    assert token
    assert files.listing() == token
    (tmp_path / "new" / "1.M1P1.host").write_bytes(b"x\n")
    assert files.listing() == ""  # new/ changed just now
    os.utime(tmp_path / "new", (old + 1, old + 1))
    assert files.listing() not in ("", token)


def test_a_real_folder_sync_sees_a_delivery_after_a_skip(tmp_path: Path) -> None:
    maildir = tmp_path / "m"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1700000000.M1P1.host").write_bytes(b"a\n")
    old = time.time() - TRUSTED_AFTER - 5
    for sub in ("new", "cur"):
        os.utime(maildir / sub, (old, old))
    idx = SqliteImapIndex(maildir / INDEX_NAME)
    try:
        assert idx.sync("INBOX", MaildirFolderFiles(maildir)).folder.messages == 1
        assert idx.sync("INBOX", MaildirFolderFiles(maildir)).folder.messages == 1
        (maildir / "new" / "1700000001.M1P1.host").write_bytes(b"b\n")
        result = idx.sync("INBOX", MaildirFolderFiles(maildir))
        assert result.folder.messages == 2 and [r.uid for r in result.added] == [2]
    finally:
        idx.close()


# --- counted in SQLite ---------------------------------------------------------------
def test_counts_and_first_unseen(index: SqliteImapIndex) -> None:
    files = ListedFiles([stem(1), stem(2), stem(3), stem(4)])
    index.sync("INBOX", files)
    assert index.first_unseen("INBOX", 5) == 1
    index.store("INBOX", [1, 2], StoreMode.ADD, [SEEN])
    index.store("INBOX", [2, 4], StoreMode.ADD, [DELETED])
    counts = index.counts("INBOX")
    assert (counts.messages, counts.unseen, counts.deleted) == (4, 2, 2)
    assert counts.size == sum(100 + n for n in (1, 2, 3, 4))  # stem()'s S=
    assert index.first_unseen("INBOX", 5) == 3
    index.expunge("INBOX", [2])
    assert index.first_unseen("INBOX", 5) == 2  # UID 3 is now the second message
    assert index.first_unseen("INBOX", 3) is None  # only UIDs below 3 asked
    index.store("INBOX", [3, 4], StoreMode.ADD, [SEEN])
    assert index.first_unseen("INBOX", 5) is None
    # A keyword that merely contains the word is not \Seen.
    index.store("INBOX", [4], StoreMode.REPLACE, ["\\Seenish"])
    assert index.first_unseen("INBOX", 5) == 3
    assert index.counts("INBOX").unseen == 1


def test_first_unseen_uses_the_partial_index(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1)]))
    plan = index._conn.execute(
        "EXPLAIN QUERY PLAN SELECT uid FROM messages WHERE folder = 1 AND uid < 9"
        " AND instr(' ' || flags || ' ', ' \\Seen ') = 0 ORDER BY uid LIMIT 1"
    ).fetchall()
    assert "messages_unseen" in " ".join(str(row) for row in plan)


# --- the structure cache -------------------------------------------------------------
def test_structures_are_kept_for_present_messages_and_go_with_them(
    index: SqliteImapIndex,
) -> None:
    files = ListedFiles([stem(1), stem(2)])
    index.sync("INBOX", files)
    index.remember_structures("INBOX", [structure(1), structure(2), structure(7)])
    found = index.structures("INBOX", {1, 2, 7})
    assert found == {1: structure(1), 2: structure(2)}  # 7 is no message: not kept
    assert index.structures("INBOX", [2]) == {2: structure(2)}
    index.expunge("INBOX", [1])
    assert index.structures("INBOX", {1, 2}) == {2: structure(2)}
    count = index._conn.execute("SELECT count(*) FROM structure").fetchone()[0]
    assert count == 1
    index.delete_folder("INBOX")
    assert index._conn.execute("SELECT count(*) FROM structure").fetchone()[0] == 0


def test_remembering_leaves_commits_durable(index: SqliteImapIndex) -> None:
    index.sync("INBOX", ListedFiles([stem(1)]))
    index.remember_structures("INBOX", [structure(1)])
    # The cache write runs with synchronous NORMAL; everything else stays FULL (2).
    assert index._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


# --- schema 1 -> 2 ---------------------------------------------------------------------
def test_a_schema_1_index_is_upgraded_in_place(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.executescript(sqlite_index._SCHEMA)
    conn.executescript(
        "INSERT INTO folders (name, uidvalidity, uidnext, highestmodseq)"
        " VALUES ('INBOX', 77, 4, 5);"
        "INSERT INTO messages VALUES (1, 1, 'a', '', '\\Seen', 1, 0, 10);"
        "INSERT INTO messages VALUES (1, 3, 'b', '', '', 1, 0, 20);"
        "PRAGMA user_version = 1;"
    )
    conn.close()
    idx = SqliteImapIndex(path)
    try:
        state = idx.folder("INBOX")
        assert state is not None
        assert (state.uidvalidity, state.uidnext, state.messages) == (77, 4, 2)
        assert idx.first_unseen("INBOX", 4) == 2
        assert idx._conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_index.SCHEMA_VERSION
    finally:
        idx.close()


# --- shared per process ----------------------------------------------------------------
def test_one_index_per_mailbox_per_process(tmp_path: Path) -> None:
    first = SqliteImapIndex.for_maildir(tmp_path)
    second = SqliteImapIndex.for_maildir(tmp_path)
    assert first is second
    first.ensure_folder("INBOX")
    first.close()
    assert second.folder("INBOX") is not None  # still open for its other holder
    second.close()
    with pytest.raises(sqlite3.ProgrammingError):
        second._conn.execute("SELECT 1")  # the last holder closed it
    third = SqliteImapIndex.for_maildir(tmp_path)
    try:
        assert third is not first and third.folder("INBOX") is not None
    finally:
        third.close()


def test_a_removed_index_file_is_not_shared_again(tmp_path: Path) -> None:
    held = SqliteImapIndex.for_maildir(tmp_path)
    held.ensure_folder("INBOX")
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"{INDEX_NAME}{suffix}").unlink(missing_ok=True)
    fresh = SqliteImapIndex.for_maildir(tmp_path)
    try:
        assert fresh is not held
        assert fresh.folder("INBOX") is None  # a new file, a new index
    finally:
        fresh.close()
        held.close()
