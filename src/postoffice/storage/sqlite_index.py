"""The embedded ``ImapIndex``: one SQLite file in each user's Maildir.

Where it lives: ``<maildir>/postoffice-imap.sqlite3`` (with SQLite's
``-wal`` and ``-shm`` beside it), next to ``maildirsize`` and the POP3 lock,
not in ``data_dir``.  The index describes the files of that Maildir and
nothing else, so it must travel with them: a mailbox retired to
``data_dir/removed/`` (storage/retired.py), restored from a backup or
copied to another server keeps its UIDs, and a new mailbox of the same name
starts with no index, hence new UIDVALIDITYs, as RFC 9051 §2.3.1.1 asks.
The name is safe for other Maildir tools: in a Maildir++ tree only entries
starting with "." are folders (Dovecot's maildir++ layout lists the root's
entries that begin with its separator "."; Courier does the same), and
Dovecot keeps its own files there the same way (``dovecot-uidlist``,
``dovecot.index*``, ``subscriptions``, ``maildirsize``).  The name avoids
those, ``tmp``/``new``/``cur`` and a leading "." (which would make it a
folder), and shares the ``postoffice-`` prefix of our POP3 files.

Durability: WAL mode with ``synchronous = FULL``, so every method that
changes the index returns only once its transaction is on stable storage.
A UID is allocated and UIDNEXT advanced in the same transaction that
records the message, so a crash (kill -9 included) either keeps both or
neither: no UID handed to anyone is ever handed out again.  Writes take
``BEGIN IMMEDIATE`` (one writer per user at a time, across processes; the
others wait up to ``BUSY_TIMEOUT_MS``), as storage/sqlite_accounts.py does.

A file SQLite calls corrupt (or "not a database") is set aside as
``<name>.corrupt-<time>`` and a new index is built from the Maildir, with
a UIDVALIDITY above any the old one gave (read from it if it still can be,
else the clock): clients then resynchronise, as RFC 9051 §2.3.1.1 requires
whenever UIDs cannot be kept.  This is logged as an error.

Speed (measured on this project's 2-core test machine; ``bench/run.py
--only imap`` sets them beside Dovecot):

* A folder whose new/ and cur/ did not change since its last full read is
  not listed again (``FolderFiles.listing``: their inodes and mtimes), so
  SELECT of a quiet 100,000-message folder is two stats and one row, under
  a millisecond; each folder keeps its message count for EXISTS and a
  partial index of its unseen messages for a rev1 SELECT's OK [UNSEEN].
* A changed folder is read as (stem, info) pairs compared as sets in C:
  0.1 s for 100,000 with nothing new.  The first sync of 100,000 files
  (a cold SELECT) takes about 0.6 s of CPU (Dovecot builds its index in
  about 0.3 s): sizes come from ",S=" in the names (no stat), dates are
  read when first asked (``ImapMailbox.with_dates``), names are listed
  with listdir and sorted by one int key (``maildir.arrival_order``),
  rows go to SQLite as tuples (``SyncResult.added`` makes records only
  when read), UIDs are given in one transaction, and ``messages_stem`` is
  built after the rows, not row by row (``_bulk_insert``).  Most of what
  is left is SQLite's insert and Python's loop over the names.
* The ``structure`` table keeps each message's ENVELOPE, BODYSTRUCTURE and
  BODY in wire form and its RFC822.SIZE, written by the first FETCH that
  computes them, so later FETCHes of them read no file.  Cache and date
  writes run with ``synchronous = NORMAL``: losing the last of them in a
  crash costs recomputing them, never a UID.
* ``for_maildir`` gives every session of a process the same index (one
  connection, its lock), so 10,000 IDLE sessions of one user hold one
  SQLite connection, not 10,000.

Not done yet: the expunged UIDs kept for VANISHED are never pruned (a
folder's ``expunged`` rows grow with its expunges; RFC 7162 §3.2.10 lets a
server forget old ones and answer with a wider VANISHED).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import overload

from postoffice.storage.imap_index import (
    MAX_UID,
    CopyResult,
    ExpungeResult,
    FolderCounts,
    FolderExists,
    FolderFiles,
    FolderState,
    ImapIndexError,
    IndexCorrupt,
    MessageRecord,
    NewMessage,
    NoSuchFolder,
    StoreMode,
    StoreResult,
    Structure,
    SyncResult,
    canonical_flags,
)
from postoffice.storage.maildir import arrival_order

log = logging.getLogger("postoffice.imap_index")

INDEX_NAME = "postoffice-imap.sqlite3"
SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 10_000
# A sync adding this many messages or more may rebuild the indexes (``_bulk_insert``).
BULK_ROWS = 5_000
# SQLite's primary result codes for a damaged file.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE folders (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL
);
CREATE TABLE messages (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    stem TEXT NOT NULL,                 -- Maildir name before ":2,"
    info TEXT NOT NULL,                 -- letters after ":2," as last seen on disk
    flags TEXT NOT NULL,                -- space-separated (flags are atoms: no spaces)
    modseq INTEGER NOT NULL,
    internaldate INTEGER NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_stem ON messages (folder, stem);
CREATE INDEX messages_modseq ON messages (folder, modseq);
CREATE TABLE expunged (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE INDEX expunged_modseq ON expunged (folder, modseq);
CREATE TABLE subscriptions (
    name TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;
"""

# Version 2: each folder's message count (SELECT and STATUS without reading
# every row) and the listing token of its last full sync (a folder whose
# new/ and cur/ did not change is not listed again), and the FETCH
# structure cache (``Structure``), filled by the first FETCH that needs it,
# and an index of the unseen messages (a rev1 SELECT's first unseen).
_MIGRATIONS = {
    2: """
ALTER TABLE folders ADD COLUMN messages INTEGER NOT NULL DEFAULT 0;
ALTER TABLE folders ADD COLUMN listing TEXT NOT NULL DEFAULT '';
UPDATE folders SET messages = (SELECT count(*) FROM messages WHERE messages.folder = folders.id);
CREATE TABLE structure (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    wire_size INTEGER NOT NULL,         -- RFC822.SIZE (CRLF line endings)
    envelope BLOB NOT NULL,             -- the wire form of ENVELOPE's value
    bodystructure BLOB NOT NULL,        -- of BODYSTRUCTURE's
    body BLOB NOT NULL,                 -- of BODY's (non-extensible)
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE INDEX messages_unseen ON messages (folder, uid)
    WHERE instr(' ' || flags || ' ', ' \\Seen ') = 0;
""",
    # Version 3: \Recent (RFC 3501 §2.3.2), for rev1 sessions: the first UID
    # of each folder that no session has yet been told about.  A folder
    # without a row has all its messages recent.  Folders that exist when
    # the version comes have none (no flood of old mail shown as new).
    3: """
CREATE TABLE recent (
    folder INTEGER PRIMARY KEY,
    first_uid INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO recent (folder, first_uid) SELECT id, uidnext FROM folders;
""",
}

_COLUMNS = "uid, stem, info, flags, modseq, internaldate, size"
_STEM_AND_INFO = operator.itemgetter(0, 2)  # of name.partition(":2,")
_FOLDER_COLUMNS = "id, name, uidvalidity, uidnext, highestmodseq, messages, listing"


@dataclass(slots=True)
class _Folder:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int
    listing: str

    def state(self) -> FolderState:
        return FolderState(
            self.name, self.uidvalidity, self.uidnext, self.highestmodseq, self.messages
        )


def _record(row: tuple[int, str, str, str, int, int, int]) -> MessageRecord:
    uid, stem, info, flags, modseq, internaldate, size = row
    return MessageRecord(uid, stem, info, frozenset(flags.split()), modseq, internaldate, size)


def _records(rows: Iterable[tuple[int, str, str, str, int, int, int]]) -> list[MessageRecord]:
    """``_record`` of each row; rows share a few flag texts, so each is
    split once (a first FETCH of 100,000 messages loads them all)."""
    sets: dict[str, frozenset[str]] = {}
    out: list[MessageRecord] = []
    for uid, stem, info, flags, modseq, internaldate, size in rows:
        found = sets.get(flags)
        if found is None:
            found = sets[flags] = frozenset(flags.split())
        out.append(MessageRecord(uid, stem, info, found, modseq, internaldate, size))
    return out


# A ``messages`` row as inserted: folder, then _COLUMNS.
_Row = tuple[int, int, str, str, str, int, int, int]


class _Records(Sequence[MessageRecord]):
    """``SyncResult.added`` of a sync: the inserted rows, made records only
    when read (the IMAP session reads none of a first SELECT's 100,000)."""

    __slots__ = ("_flags", "_rows")

    def __init__(self, rows: Sequence[_Row]) -> None:
        self._rows = rows
        self._flags: dict[str, frozenset[str]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __eq__(self, other: object) -> bool:
        # As the tuple it stands for (SyncResult compares its fields).
        if not isinstance(other, Sequence):
            return NotImplemented
        return tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]  # a list-like: unhashable

    def __repr__(self) -> str:
        return f"_Records({list(self)!r})"

    @overload
    def __getitem__(self, i: int) -> MessageRecord: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[MessageRecord]: ...

    def __getitem__(self, i: int | slice) -> MessageRecord | Sequence[MessageRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        _folder, uid, stem, info, text, modseq, internaldate, size = self._rows[i]
        flags = self._flags.get(text)
        if flags is None:
            flags = self._flags[text] = frozenset(text.split())
        return MessageRecord(uid, stem, info, flags, modseq, internaldate, size)


def _flag_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(flags))


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


# Open indexes by file path (``SqliteImapIndex.for_maildir``).
_SHARED: dict[str, SqliteImapIndex] = {}
_SHARED_LOCK = threading.Lock()


class SqliteImapIndex:
    """``ImapIndex`` on one SQLite file; thread-safe (one connection, a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn = self._open_or_rebuild()
        self._inode = os.stat(path).st_ino
        self._users = 1  # holders of a shared index (``for_maildir``)

    @classmethod
    def for_maildir(cls, maildir: Path) -> SqliteImapIndex:
        """The index of ``maildir``, shared by every session of this process
        that has it open (each ``close`` gives one back; the last closes it):
        one SQLite connection and its two descriptors per mailbox, not per
        session, so that 10,000 IDLE sessions of one user cost one."""
        key = os.path.abspath(maildir / INDEX_NAME)
        with _SHARED_LOCK:
            index = _SHARED.get(key)
            if index is not None and index._same_file():
                index._users += 1
                return index
            # None open, or its file was removed or replaced (a corrupt one set
            # aside by another process, a restored backup): a new connection;
            # the old one closes when its last holder lets go.
            index = cls(Path(key))
            _SHARED[key] = index
            return index

    def _same_file(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            return False

    # --- opening, corruption -----------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            # 0600 before SQLite sees it; its -wal and -shm files follow the mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL in WAL mode: each commit is fsync'd before it returns.
            conn.execute("PRAGMA synchronous = FULL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ImapIndexError(
                f"IMAP index {self.path} has schema version {version}; this postoffice"
                f" knows up to {SCHEMA_VERSION} (was it written by a newer release?)"
            )
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Again under the lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                _run_script(conn, _SCHEMA)
                version = 1
            for target in range(version + 1, SCHEMA_VERSION + 1):
                _run_script(conn, _MIGRATIONS[target])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _open_or_rebuild(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.Error as exc:
            if not _is_corruption(exc):
                raise ImapIndexError(f"cannot open IMAP index {self.path}: {exc}") from None
            self._set_aside(exc)
            return self._connect()

    def _set_aside(self, exc: sqlite3.Error) -> None:
        """Move a corrupt index out of the way; a new one gets a new UIDVALIDITY
        above the old file's, if it can still tell."""
        floor = _last_uidvalidity(self.path)
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
        log.error(
            "IMAP index %s is corrupt (%s): set aside as %s; rebuilding with new UIDVALIDITYs",
            self.path,
            exc,
            aside.name,
        )
        conn = self._connect()
        try:
            conn.execute("INSERT INTO meta (key, value) VALUES ('uidvalidity', ?)", (floor,))
        finally:
            conn.close()

    def _fault(self, exc: sqlite3.Error) -> ImapIndexError:
        """The error to raise for ``exc``; a corrupt file is rebuilt first."""
        if not _is_corruption(exc):
            return ImapIndexError(f"IMAP index {self.path}: {exc}")
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._set_aside(exc)
        self._conn = self._connect()
        self._inode = os.stat(self.path).st_ino
        return IndexCorrupt(f"IMAP index {self.path} was corrupt and is rebuilt: {exc}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction holding the write lock."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._fault(exc) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._fault(exc) from None
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read (a deferred transaction)."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._fault(exc) from None

    def close(self) -> None:
        with _SHARED_LOCK:
            self._users -= 1
            if self._users > 0:
                return
            if _SHARED.get(os.fspath(self.path)) is self:
                del _SHARED[os.fspath(self.path)]
        with self._lock:
            self._conn.close()

    # --- folders -------------------------------------------------------------------
    @staticmethod
    def _find(conn: sqlite3.Connection, name: str) -> _Folder | None:
        row = conn.execute(
            f"SELECT {_FOLDER_COLUMNS} FROM folders WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _Folder(*row)

    def _get(self, conn: sqlite3.Connection, name: str) -> _Folder:
        found = self._find(conn, name)
        if found is None:
            raise NoSuchFolder(f"no such folder: {name}")
        return found

    @staticmethod
    def _save(conn: sqlite3.Connection, folder: _Folder) -> None:
        conn.execute(
            "UPDATE folders SET uidnext = ?, highestmodseq = ?, messages = ?, listing = ?"
            " WHERE id = ?",
            (folder.uidnext, folder.highestmodseq, folder.messages, folder.listing, folder.id),
        )

    @staticmethod
    def _create(conn: sqlite3.Connection, name: str) -> _Folder:
        # RFC 9051 §2.3.1.1: a folder created again (after a delete, or with a
        # lost index) must not reuse a UIDVALIDITY.  The clock, but always
        # above the last one this index gave out.
        row = conn.execute("SELECT value FROM meta WHERE key = 'uidvalidity'").fetchone()
        uidvalidity = max(int(time.time()), (row[0] if row else 0) + 1)
        if uidvalidity > MAX_UID:
            raise ImapIndexError("UIDVALIDITY would exceed 32 bits")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('uidvalidity', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (uidvalidity,),
        )
        # HIGHESTMODSEQ starts at 1: a mod-sequence is a positive number (RFC 7162 §3.1.1).
        cursor = conn.execute(
            "INSERT INTO folders (name, uidvalidity, uidnext, highestmodseq) VALUES (?, ?, 1, 1)",
            (name, uidvalidity),
        )
        assert cursor.lastrowid is not None
        return _Folder(cursor.lastrowid, name, uidvalidity, 1, 1, 0, "")

    def folder(self, name: str) -> FolderState | None:
        with self._read() as conn:
            found = self._find(conn, name)
        return None if found is None else found.state()

    def folders(self) -> list[FolderState]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_FOLDER_COLUMNS} FROM folders ORDER BY name").fetchall()
        return [_Folder(*row).state() for row in rows]

    def create_folder(self, name: str) -> FolderState:
        with self._write() as conn:
            if self._find(conn, name) is not None:
                raise FolderExists(f"folder exists: {name}")
            return self._create(conn, name).state()

    def ensure_folder(self, name: str) -> FolderState:
        with self._write() as conn:
            found = self._find(conn, name)
            return (found or self._create(conn, name)).state()

    def rename_folder(self, old: str, new: str) -> FolderState:
        with self._write() as conn:
            found = self._get(conn, old)
            if old != new:
                if self._find(conn, new) is not None:
                    raise FolderExists(f"folder exists: {new}")
                conn.execute("UPDATE folders SET name = ? WHERE id = ?", (new, found.id))
                found.name = new
            return found.state()

    def delete_folder(self, name: str) -> None:
        with self._write() as conn:
            found = self._get(conn, name)
            for table in ("messages", "expunged", "structure"):
                conn.execute(f"DELETE FROM {table} WHERE folder = ?", (found.id,))
            conn.execute("DELETE FROM recent WHERE folder = ?", (found.id,))
            conn.execute("DELETE FROM folders WHERE id = ?", (found.id,))

    # --- sync ------------------------------------------------------------------------
    def sync(self, folder: str, files: FolderFiles) -> SyncResult:
        # A folder whose directories did not change since its last full read
        # is not read again: a SELECT of a quiet 100,000-message folder costs
        # two stats and one row (Dovecot checks the directories' mtimes too).
        token = files.listing()
        if token:
            with self._read() as conn:
                found = self._find(conn, folder)
            if found is not None and found.listing == token:
                return SyncResult(found.state())
        with self._write() as conn:
            f = self._find(conn, folder) or self._create(conn, folder)
            known = dict(conn.execute("SELECT stem, info FROM messages WHERE folder = ?", (f.id,)))
            # Listed inside the write lock: an APPEND committed meanwhile is not
            # missing from this listing, it waits for this transaction.  The
            # token is taken before the listing: a change during it moves the
            # token, so the next sync reads again.
            token = files.listing()
            # stem -> info, the loop in C (map, not a Python loop: 100,000
            # names on a first SELECT); cur/ comes last, so it wins over a
            # stale new/ entry.
            disk: dict[str, str] = dict(
                map(_STEM_AND_INFO, map(str.partition, files.names(), repeat(":2,")))
            )
            # Set operations in C: a folder with nothing new costs no Python loop.
            differing: Collection[tuple[str, str]] = disk.items()
            missing: Collection[str] = ()
            if known:
                differing = disk.items() - known.items()
                missing = known.keys() - disk.keys()
            if not differing and not missing:
                if f.listing != token:
                    f.listing = token
                    self._save(conn, f)
                return SyncResult(f.state())
            f.listing = token
            return self._apply_sync(conn, f, files, known, disk, differing, missing)

    def _apply_sync(
        self,
        conn: sqlite3.Connection,
        f: _Folder,
        files: FolderFiles,
        known: dict[str, str],
        disk: dict[str, str],
        differing: Iterable[tuple[str, str]],
        missing: Iterable[str],
    ) -> SyncResult:
        modseq = f.highestmodseq + 1
        missing = set(missing)
        gone_stems = missing.intersection(files.gone(list(missing))) if missing else set()
        gone = sorted(
            conn.execute(
                "SELECT uid FROM messages WHERE folder = ? AND stem = ?", (f.id, stem)
            ).fetchone()[0]
            for stem in gone_stems
        )
        self._remove(conn, f, gone, modseq)
        flags_changed: list[MessageRecord] = []
        # A folder read for the first time: every file is new (no set of
        # 100,000 pairs to build and walk).
        new: list[str] = list(disk) if not known else []
        for stem, info in () if not known else differing:
            if stem not in known:
                new.append(stem)
                continue
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE folder = ? AND stem = ?", (f.id, stem)
            ).fetchone()
            old = _record(row)
            # Apply what the other tool changed (old info -> new info) to the
            # flags we hold: flags no letter can carry (keywords past "z") stay,
            # and our own rename after a STORE changes nothing.
            was, now = files.flags(old.info), files.flags(info)
            flags = (old.flags - (was - now)) | (now - was)
            if flags == old.flags:
                conn.execute(
                    "UPDATE messages SET info = ? WHERE folder = ? AND uid = ?",
                    (info, f.id, old.uid),
                )
                continue
            conn.execute(
                "UPDATE messages SET info = ?, flags = ?, modseq = ? WHERE folder = ? AND uid = ?",
                (info, _flag_text(flags), modseq, f.id, old.uid),
            )
            flags_changed.append(
                MessageRecord(old.uid, stem, info, flags, modseq, old.internaldate, old.size)
            )
        # New files get UIDs in delivery order (the time at the start of a
        # Maildir name), so UIDs ascend with arrival (RFC 9051 §2.3.1.1).
        # This loop is most of a first SELECT of a big folder: rows are
        # built as the tuples SQLite takes, records only when asked for.
        rows: list[_Row] = []
        texts: dict[str, str] = {}  # info -> flag text: most files share a few infos
        facts_of = files.facts
        uid = f.uidnext
        fid = f.id
        for stem in arrival_order(new):
            info = disk[stem]
            if info:
                facts = facts_of(f"{stem}:2,{info}")
            else:  # in new/ with no info, or in cur/ as "<stem>:2," (no flags)
                facts = facts_of(stem) or facts_of(f"{stem}:2,")
            if facts is None:
                continue  # gone since the listing: never had a UID
            text = texts.get(info)
            if text is None:
                text = texts[info] = _flag_text(files.flags(info))
            rows.append((fid, uid, stem, info, text, modseq, facts.internaldate, facts.size))
            uid += 1
        if uid - 1 > MAX_UID:
            # RFC 9051 §2.3.1.1 would need a new UIDVALIDITY; 4 billion
            # messages in one folder is not a case this index serves.
            raise ImapIndexError(f"folder {f.name}: no UIDs left")
        f.uidnext = uid
        self._insert_rows(conn, f, rows)
        if gone or flags_changed or rows:
            f.highestmodseq = modseq
        self._save(conn, f)
        flags_changed.sort(key=lambda r: r.uid)
        added = _Records(rows)
        return SyncResult(f.state(), added, tuple(gone), tuple(flags_changed))

    @staticmethod
    def _next_uid(f: _Folder) -> int:
        if f.uidnext > MAX_UID:
            # RFC 9051 §2.3.1.1 would need a new UIDVALIDITY; 4 billion
            # messages in one folder is not a case this index serves.
            raise ImapIndexError(f"folder {f.name}: no UIDs left")
        uid = f.uidnext
        f.uidnext += 1
        return uid

    @classmethod
    def _insert(
        cls, conn: sqlite3.Connection, f: _Folder, records: Sequence[MessageRecord]
    ) -> None:
        texts: dict[frozenset[str], str] = {}  # a batch shares a few flag sets

        def text(flags: frozenset[str]) -> str:
            found = texts.get(flags)
            if found is None:
                found = texts[flags] = _flag_text(flags)
            return found

        rows = [
            (f.id, r.uid, r.stem, r.info, text(r.flags), r.modseq, r.internaldate, r.size)
            for r in records
        ]
        cls._insert_rows(conn, f, rows)

    @staticmethod
    def _insert_rows(conn: sqlite3.Connection, f: _Folder, rows: Sequence[_Row]) -> None:
        sql = f"INSERT INTO messages (folder, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        if len(rows) < BULK_ROWS:
            conn.executemany(sql, rows)
        else:
            _bulk_insert(conn, sql, rows)
        f.messages += len(rows)

    @staticmethod
    def _remove(conn: sqlite3.Connection, f: _Folder, uids: Sequence[int], modseq: int) -> None:
        """Expunge ``uids`` (known to be present) at ``modseq``: kept for VANISHED."""
        for table in ("messages", "structure"):
            conn.executemany(
                f"DELETE FROM {table} WHERE folder = ? AND uid = ?", ((f.id, u) for u in uids)
            )
        conn.executemany(
            "INSERT OR REPLACE INTO expunged (folder, uid, modseq) VALUES (?, ?, ?)",
            ((f.id, u, modseq) for u in uids),
        )
        f.messages -= len(uids)

    @staticmethod
    def _rows(conn: sqlite3.Connection, f: _Folder, uids: Iterable[int]) -> list[MessageRecord]:
        """The records of those of ``uids`` present, ascending.  One range
        scan filtered in Python: ``1:*`` and runs are the usual sets."""
        wanted = set(uids)
        if not wanted:
            return []
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE folder = ? AND uid BETWEEN ? AND ?"
            " ORDER BY uid",
            (f.id, min(wanted), max(wanted)),
        )
        return _records(row for row in rows if row[0] in wanted)

    # --- APPEND, COPY, MOVE ---------------------------------------------------------
    def append(self, folder: str, messages: Sequence[NewMessage]) -> tuple[int, ...]:
        with self._write() as conn:
            f = self._get(conn, folder)
            modseq = f.highestmodseq + 1
            uids = [
                self._add(conn, f, m.name, canonical_flags(m.flags), m.internaldate, m.size, modseq)
                for m in messages
            ]
            if messages:
                f.highestmodseq = modseq
            self._save(conn, f)
            return tuple(uids)

    def _add(
        self,
        conn: sqlite3.Connection,
        f: _Folder,
        name: str,
        flags: frozenset[str],
        internaldate: int,
        size: int,
        modseq: int,
    ) -> int:
        """A UID for a file the caller wrote into ``f``: the one a ``sync``
        gave it already (the caller's flags win), or the next."""
        stem, _sep, info = name.partition(":2,")
        row = conn.execute(
            "SELECT uid FROM messages WHERE folder = ? AND stem = ?", (f.id, stem)
        ).fetchone()
        if row is not None:
            conn.execute(
                "UPDATE messages SET info = ?, flags = ?, modseq = ?, internaldate = ?"
                " WHERE folder = ? AND uid = ?",
                (info, _flag_text(flags), modseq, internaldate, f.id, row[0]),
            )
            return int(row[0])
        uid = self._next_uid(f)
        self._insert(conn, f, [MessageRecord(uid, stem, info, flags, modseq, internaldate, size)])
        return uid

    def copy(self, source: str, target: str, pairs: Sequence[tuple[int, str]]) -> CopyResult:
        return self._copy(source, target, pairs, move=False)

    def move(self, source: str, target: str, pairs: Sequence[tuple[int, str]]) -> CopyResult:
        if source == target:
            raise ImapIndexError("MOVE needs another folder")
        return self._copy(source, target, pairs, move=True)

    def _copy(
        self, source: str, target: str, pairs: Sequence[tuple[int, str]], *, move: bool
    ) -> CopyResult:
        with self._write() as conn:
            src = self._get(conn, source)
            dst = src if source == target else self._get(conn, target)
            found = {r.uid: r for r in self._rows(conn, src, (uid for uid, _name in pairs))}
            dst_modseq = dst.highestmodseq + 1
            mapped: list[tuple[int, int]] = []
            for uid, name in pairs:
                r = found.get(uid)
                if r is None:
                    continue  # expunged meanwhile: nothing to copy (RFC 4315 §3 lists only copies)
                new_uid = self._add(conn, dst, name, r.flags, r.internaldate, r.size, dst_modseq)
                mapped.append((uid, new_uid))
            if mapped:
                dst.highestmodseq = dst_modseq
            self._save(conn, dst)
            expunged: tuple[int, ...] = ()
            if move and mapped:
                expunged = tuple(sorted(uid for uid, _new in mapped))
                src.highestmodseq += 1
                self._remove(conn, src, expunged, src.highestmodseq)
                self._save(conn, src)
            return CopyResult(dst.uidvalidity, tuple(mapped), expunged)

    # --- flags and expunges -------------------------------------------------------------
    def store(
        self,
        folder: str,
        uids: Iterable[int],
        mode: StoreMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> StoreResult:
        given = canonical_flags(flags)
        with self._write() as conn:
            f = self._get(conn, folder)
            modseq = f.highestmodseq + 1
            changed: list[MessageRecord] = []
            modified: list[int] = []
            for r in self._rows(conn, f, uids):
                # RFC 7162 §3.1.3: a message changed after UNCHANGEDSINCE is
                # left alone and reported in MODIFIED.
                if unchanged_since is not None and r.modseq > unchanged_since:
                    modified.append(r.uid)
                    continue
                if mode is StoreMode.REPLACE:
                    new = given
                elif mode is StoreMode.ADD:
                    new = r.flags | given
                else:
                    new = r.flags - given
                if new != r.flags:
                    changed.append(
                        MessageRecord(r.uid, r.stem, r.info, new, modseq, r.internaldate, r.size)
                    )
            if not changed:
                return StoreResult(f.highestmodseq, (), tuple(modified))
            conn.executemany(
                "UPDATE messages SET flags = ?, modseq = ? WHERE folder = ? AND uid = ?",
                ((_flag_text(r.flags), modseq, f.id, r.uid) for r in changed),
            )
            f.highestmodseq = modseq
            self._save(conn, f)
            return StoreResult(modseq, tuple(changed), tuple(modified))

    def note_info(self, folder: str, uid: int, info: str) -> None:
        with self._write() as conn:
            f = self._get(conn, folder)
            conn.execute(
                "UPDATE messages SET info = ? WHERE folder = ? AND uid = ?", (info, f.id, uid)
            )

    def expunge(self, folder: str, uids: Iterable[int]) -> ExpungeResult:
        with self._write() as conn:
            f = self._get(conn, folder)
            present = [r.uid for r in self._rows(conn, f, uids)]
            if not present:
                return ExpungeResult(f.highestmodseq, ())
            f.highestmodseq += 1
            self._remove(conn, f, present, f.highestmodseq)
            self._save(conn, f)
            return ExpungeResult(f.highestmodseq, tuple(present))

    # --- queries ---------------------------------------------------------------------
    def messages(self, folder: str, first: int = 1, last: int = MAX_UID) -> list[MessageRecord]:
        with self._read() as conn:
            f = self._get(conn, folder)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE folder = ? AND uid BETWEEN ? AND ?"
                " ORDER BY uid",
                (f.id, first, last),
            ).fetchall()
        return _records(rows)

    def uids(self, folder: str, first: int = 1, last: int = MAX_UID) -> list[int]:
        with self._read() as conn:
            f = self._get(conn, folder)
            rows = conn.execute(
                "SELECT uid FROM messages WHERE folder = ? AND uid BETWEEN ? AND ? ORDER BY uid",
                (f.id, first, last),
            ).fetchall()
        return [row[0] for row in rows]

    def changed_since(self, folder: str, modseq: int) -> list[MessageRecord]:
        with self._read() as conn:
            f = self._get(conn, folder)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE folder = ? AND modseq > ? ORDER BY uid",
                (f.id, modseq),
            ).fetchall()
        return _records(rows)

    def vanished_since(self, folder: str, modseq: int) -> list[int]:
        with self._read() as conn:
            f = self._get(conn, folder)
            rows = conn.execute(
                "SELECT uid FROM expunged WHERE folder = ? AND modseq > ? ORDER BY uid",
                (f.id, modseq),
            ).fetchall()
        return [row[0] for row in rows]

    def counts(self, folder: str) -> FolderCounts:
        # Flags are stored sorted and space-separated: a flag is present when
        # " flag " is in " flags ".  One pass in SQLite, no row in Python.
        with self._read() as conn:
            f = self._get(conn, folder)
            row = conn.execute(
                "SELECT count(*),"
                " coalesce(sum(instr(' ' || flags || ' ', ' \\Seen ') = 0), 0),"
                " coalesce(sum(instr(' ' || flags || ' ', ' \\Deleted ') > 0), 0),"
                " coalesce(sum(size), 0)"
                " FROM messages WHERE folder = ?",
                (f.id,),
            ).fetchone()
        return FolderCounts(*row)

    def first_unseen(self, folder: str, below: int) -> int | None:
        # The WHERE repeats messages_unseen's, so SQLite answers from it.
        with self._read() as conn:
            f = self._get(conn, folder)
            row = conn.execute(
                "SELECT uid FROM messages WHERE folder = ? AND uid < ?"
                " AND instr(' ' || flags || ' ', ' \\Seen ') = 0 ORDER BY uid LIMIT 1",
                (f.id, below),
            ).fetchone()
            if row is None:
                return None
            (position,) = conn.execute(
                "SELECT count(*) FROM messages WHERE folder = ? AND uid <= ?", (f.id, row[0])
            ).fetchone()
        return int(position)

    # --- \Recent (RFC 3501 §2.3.2) -----------------------------------------------------
    def first_recent(self, folder: str) -> int:
        with self._read() as conn:
            return self._first_recent(conn, self._get(conn, folder))

    @staticmethod
    def _first_recent(conn: sqlite3.Connection, f: _Folder) -> int:
        row = conn.execute("SELECT first_uid FROM recent WHERE folder = ?", (f.id,)).fetchone()
        return 1 if row is None else int(row[0])

    def claim_recent(self, folder: str, below: int) -> int:
        with self._read() as conn:
            first = self._first_recent(conn, self._get(conn, folder))
        if first >= below:
            return below  # nothing new since the last claim: no write
        # What a crash loses here is only which session saw mail first.
        with self._rebuildable_write() as conn:
            f = self._get(conn, folder)
            first = self._first_recent(conn, f)
            if first < below:
                conn.execute(
                    "INSERT INTO recent (folder, first_uid) VALUES (?, ?)"
                    " ON CONFLICT (folder) DO UPDATE SET first_uid = excluded.first_uid",
                    (f.id, below),
                )
        return min(first, below)

    def recent_count(self, folder: str, first: int | None = None, below: int = MAX_UID + 1) -> int:
        with self._read() as conn:
            f = self._get(conn, folder)
            if first is None:
                first = self._first_recent(conn, f)
            below = min(below, f.uidnext)
            if first >= below:
                return 0
            # count(*) walks every row it counts: a rev1 SELECT of a
            # 100,000-message folder all recent would walk them all.  The
            # folder's kept count answers for the tail [first, UIDNEXT),
            # less the rows below ``first`` when those are the fewer.
            if below == f.uidnext and first - 1 < below - first:
                (older,) = conn.execute(
                    "SELECT count(*) FROM messages WHERE folder = ? AND uid < ?", (f.id, first)
                ).fetchone()
                return f.messages - int(older)
            (count,) = conn.execute(
                "SELECT count(*) FROM messages WHERE folder = ? AND uid >= ? AND uid < ?",
                (f.id, first, below),
            ).fetchone()
        return int(count)

    # --- the FETCH structure cache ----------------------------------------------------
    def structures(self, folder: str, uids: Collection[int]) -> dict[int, Structure]:
        if not uids:
            return {}
        with self._read() as conn:
            f = self._get(conn, folder)
            rows = conn.execute(
                "SELECT uid, wire_size, envelope, bodystructure, body FROM structure"
                " WHERE folder = ? AND uid BETWEEN ? AND ?",
                (f.id, min(uids), max(uids)),
            ).fetchall()
        wanted = uids if isinstance(uids, set | frozenset) else set(uids)
        return {row[0]: Structure(*row) for row in rows if row[0] in wanted}

    def remember_structures(self, folder: str, structures: Sequence[Structure]) -> None:
        if not structures:
            return
        with self._rebuildable_write() as conn:
            f = self._get(conn, folder)
            # Only for messages still present: one expunged meanwhile must
            # not leave a row behind.
            conn.executemany(
                "INSERT OR IGNORE INTO structure"
                " (folder, uid, wire_size, envelope, bodystructure, body)"
                " SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS"
                " (SELECT 1 FROM messages WHERE folder = ? AND uid = ?)",
                (
                    (f.id, s.uid, s.wire_size, s.envelope, s.bodystructure, s.body, f.id, s.uid)
                    for s in structures
                ),
            )

    def note_dates(self, folder: str, dates: Sequence[tuple[int, int]]) -> None:
        if not dates:
            return
        with self._rebuildable_write() as conn:
            f = self._get(conn, folder)
            conn.executemany(
                "UPDATE messages SET internaldate = ? WHERE folder = ? AND uid = ?",
                ((date, f.id, uid) for uid, date in dates),
            )

    @contextlib.contextmanager
    def _rebuildable_write(self) -> Iterator[sqlite3.Connection]:
        """A write of what the files can give again (the structure cache,
        dates read from mtimes): not worth an fsync each.  WAL with
        synchronous NORMAL keeps the file consistent; a crash may lose the
        last of these writes, never a UID."""
        with self._lock:
            self._conn.execute("PRAGMA synchronous = NORMAL")
            try:
                with self._write() as conn:
                    yield conn
            finally:
                self._conn.execute("PRAGMA synchronous = FULL")

    # --- subscriptions ------------------------------------------------------------------
    def subscribe(self, name: str) -> None:
        # RFC 9051 §6.3.7: a name may be subscribed whether or not it exists.
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO subscriptions (name) VALUES (?)", (name,))

    def unsubscribe(self, name: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM subscriptions WHERE name = ?", (name,))

    def subscriptions(self) -> list[str]:
        with self._read() as conn:
            rows = conn.execute("SELECT name FROM subscriptions ORDER BY name").fetchall()
        return [row[0] for row in rows]


def _bulk_insert(conn: sqlite3.Connection, sql: str, rows: Sequence[_Row]) -> None:
    """``executemany(sql, rows)`` of new message rows, in the
    caller's transaction.  When they outnumber the rows already there (a
    first sync of a big folder: the cold SELECT), ``messages_stem`` is
    dropped and built again after, in the same transaction: building an
    index sorts its keys once, where inserting 100,000 stems one by one
    lands each on a random page of it (the other indexes take the rows in
    UID order, at their end).  A crash before the commit rolls all of it
    back, the dropped index included."""
    (present,) = conn.execute("SELECT coalesce(sum(messages), 0) FROM folders").fetchone()
    if len(rows) <= present:
        conn.executemany(sql, rows)
        return
    (create,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'messages_stem'"
    ).fetchone()
    conn.execute("DROP INDEX messages_stem")
    conn.executemany(sql, rows)
    conn.execute(create)


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Each statement of ``script`` in the caller's transaction
    (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _last_uidvalidity(path: Path) -> int:
    """The highest UIDVALIDITY a (damaged) index file gave out, 0 if it cannot tell."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        values = [0]
        with contextlib.suppress(sqlite3.Error):
            values.append(conn.execute("SELECT max(uidvalidity) FROM folders").fetchone()[0] or 0)
        with contextlib.suppress(sqlite3.Error):
            row = conn.execute("SELECT value FROM meta WHERE key = 'uidvalidity'").fetchone()
            values.append(row[0] if row else 0)
        return max(values)
    finally:
        conn.close()
