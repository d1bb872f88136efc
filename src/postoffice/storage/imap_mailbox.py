"""One user's mailboxes as an IMAP session sees them: folders, files and index together.

The IMAP session (``net/imap_session.py``) speaks in folder names, UIDs and
message records; this module turns each of its commands into the file work
and the index calls, in the order ``storage/imap_index.py`` asks: change
the files first and then tell the index (APPEND, COPY, MOVE, EXPUNGE), but
flags in the index first and then in the file name (STORE).

Everything blocks (fsync, renames, SQLite): the session runs each method in
its executor, as POP3 runs ``Pop3Mailbox``.

* **APPEND** is durable before it returns (RFC 9051 §6.3.12 answers OK
  only then): the message, converted to LF line endings as every file here
  is stored, is written to ``tmp/`` with ``safeio``'s write and fsync, its
  mtime set to the INTERNALDATE (Dovecot's convention, which
  ``index_files`` reads back), renamed into ``cur/`` (or ``new/`` without
  flags) and the directory fsync'd.  Its name is made by the one Maildir
  namer (``storage/maildir.py``), with ``S=`` and ``W=`` as delivery writes
  them, so POP3 lists it without reading it.
* **COPY** links the file into the target (a copy where links cannot go),
  **MOVE** renames it there; both give the new file a fresh unique name and
  keep its flag letters; the target directory is fsync'd before the index
  hears of it.
* **EXPUNGE** unlinks, fsyncs the directories, then tells the index.
* **Seeing other sessions' changes** (``refresh``): the index's sync pulls
  in what changed on disk (deliveries, POP3 DELE, other Maildir tools),
  then ``changed_since``/``vanished_since`` the mod-sequence the session
  last saw give what other IMAP sessions changed through the index too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from postoffice.storage import quota
from postoffice.storage.folder_names import FolderName
from postoffice.storage.folders import Folders
from postoffice.storage.imap_index import (
    SYSTEM_FLAGS,
    CopyResult,
    ExpungeResult,
    FolderState,
    ImapIndex,
    MessageRecord,
    NewMessage,
    NoSuchFolder,
    StoreMode,
    StoreResult,
    canonical_flags,
)
from postoffice.storage.index_files import MaildirFolderFiles
from postoffice.storage.maildir import Namer, ensure_maildir
from postoffice.storage.maildir_flags import (
    INFO,
    MessageGone,
    change_flags,
    find_by_stem,
    keyword_letters,
    read_keywords,
    system_letters,
)
from postoffice.storage.safeio import fsync_dir, write_all
from postoffice.storage.sqlite_index import SqliteImapIndex


@dataclass(frozen=True, slots=True)
class Refresh:
    """What changed in a folder since the mod-sequence a session last saw."""

    state: FolderState
    changed: tuple[MessageRecord, ...]  # new messages and flag changes, ascending UID
    vanished: tuple[int, ...]  # UIDs expunged, ascending


@dataclass(frozen=True, slots=True)
class View:
    """A selected folder's messages as of its SELECT (``ImapMailbox.view``)."""

    records: tuple[MessageRecord, ...]  # present, ascending UID
    expunged: tuple[int, ...]  # UIDs removed since the SELECT, ascending


@dataclass(frozen=True, slots=True)
class FolderStatus:
    """STATUS (RFC 9051 §6.3.11) of a folder."""

    state: FolderState
    messages: int
    unseen: int
    deleted: int
    size: int  # octets as stored (LF endings)


class ImapMailbox:
    """The folders and index of the Maildir at ``maildir`` (INBOX)."""

    def __init__(self, maildir: Path, index: ImapIndex, hostname: str | None = None) -> None:
        self.maildir = maildir
        self.folders = Folders(maildir)
        self.index = index
        self._namer = Namer(hostname)

    @classmethod
    def open(cls, maildir: Path, hostname: str | None = None) -> ImapMailbox:
        """Open (and on first use create) the Maildir, its special-use
        folders (RFC 6154, the issue's first-login rule) and its index."""
        ensure_maildir(maildir)
        Folders(maildir).ensure_special_use()
        return cls(maildir, SqliteImapIndex.for_maildir(maildir), hostname)

    def close(self) -> None:
        self.index.close()

    # --- reading ----------------------------------------------------------------
    def _files(self, path: Path) -> MaildirFolderFiles:
        return MaildirFolderFiles(path, read_keywords(path))

    def sync(self, name: FolderName) -> FolderState:
        path = self.folders.path(name)
        return self.index.sync(name.imap(), self._files(path)).folder

    def select(self, name: FolderName) -> FolderState:
        """SELECT: the folder brought up to date (its messages are read by
        ``view`` when the session first needs them)."""
        return self.sync(name)

    def view(self, name: FolderName, selected: FolderState) -> View:
        """The messages as they were when ``selected`` was taken (SELECT
        told the client that many): the messages below its UIDNEXT still
        here, and the UIDs of those expunged since, whose EXPUNGE the
        session then owes the client.  Later arrivals are left to the
        session's next refresh, which reports them as new."""
        key = name.imap()
        records = self.index.messages(key, 1, selected.uidnext - 1)
        gone = [u for u in self.index.vanished_since(key, selected.highestmodseq)]
        gone = [u for u in gone if u < selected.uidnext]
        return View(tuple(records), tuple(gone))

    def refresh(self, name: FolderName, since: int) -> Refresh:
        state = self.sync(name)
        key = name.imap()
        changed = self.index.changed_since(key, since)
        vanished = self.index.vanished_since(key, since)
        return Refresh(state, tuple(changed), tuple(vanished))

    def status(self, name: FolderName) -> FolderStatus:
        state = self.sync(name)
        counts = self.index.counts(name.imap())
        return FolderStatus(state, counts.messages, counts.unseen, counts.deleted, counts.size)

    @staticmethod
    def _expected(path: Path, record: MessageRecord) -> str:
        """Where ``record``'s file is unless someone renamed it since."""
        if record.info:
            return f"{path}/cur/{record.stem}{INFO}{record.info}"
        return f"{path}/new/{record.stem}"

    def _locate(self, path: Path, record: MessageRecord) -> Path:
        """The file of ``record`` now; MessageGone if there is none."""
        candidate = Path(self._expected(path, record))
        if candidate.exists():
            return candidate
        found = find_by_stem(path, record.stem)
        if found is None:
            raise MessageGone(record.stem)
        return path / found[0] / found[1]

    def read(self, name: FolderName, record: MessageRecord) -> bytes:
        """The message as stored (LF endings); MessageGone if removed."""
        path = self.folders.path(name)
        # The usual case first, with no stat before the open: the file is
        # where the index last saw it.
        with contextlib.suppress(FileNotFoundError):
            return _read_file(self._expected(path, record), record.size)
        for _attempt in range(3):
            try:
                return _read_file(os.fspath(self._locate(path, record)), record.size)
            except FileNotFoundError:
                continue  # renamed between the look and the open
        raise MessageGone(record.stem)

    def open_message(self, name: FolderName, record: MessageRecord) -> BinaryIO:
        """The message file, open for reading (LF endings); MessageGone if
        removed.  Still readable after a MOVE renames it (spam learning)."""
        path = self.folders.path(name)
        for _attempt in range(3):
            try:
                return open(self._locate(path, record), "rb")
            except FileNotFoundError:
                continue  # renamed between the look and the open
        raise MessageGone(record.stem)

    @contextlib.contextmanager
    def reader(self, name: FolderName) -> Iterator[Callable[[MessageRecord], bytes]]:
        """``read`` for many messages of one folder (a FETCH batch): new/ and
        cur/ are opened once and each file relative to them, which spares
        the kernel a walk of the whole path per message."""
        path = self.folders.path(name)
        dirs: dict[str, int] = {}
        try:
            for sub in ("new", "cur"):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    dirs[sub] = os.open(
                        f"{path}/{sub}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    )

            def read(record: MessageRecord) -> bytes:
                if record.info:
                    fd, filename = dirs.get("cur"), f"{record.stem}{INFO}{record.info}"
                else:
                    fd, filename = dirs.get("new"), record.stem
                if fd is not None:
                    try:  # not contextlib.suppress: this runs once per message fetched
                        return _read_file(filename, record.size, dir_fd=fd)
                    except FileNotFoundError:
                        pass
                return self.read(name, record)  # renamed since: looked for by stem

            yield read
        finally:
            for fd in dirs.values():
                os.close(fd)

    def with_dates(self, name: FolderName, records: Sequence[MessageRecord]) -> list[MessageRecord]:
        """``records`` with every INTERNALDATE known: those ``sync`` left at 0
        (it takes sizes from the file names, not from a stat) read from the
        files' mtimes now and kept in the index.  A file gone meanwhile
        keeps 0 (1970, harmless: it is reported expunged next)."""
        path = self.folders.path(name)
        out: list[MessageRecord] = []
        found: list[tuple[int, int]] = []
        for record in records:
            if record.internaldate:
                out.append(record)
                continue
            try:
                try:
                    st = os.stat(self._expected(path, record))
                except FileNotFoundError:
                    st = os.stat(self._locate(path, record))
            except (MessageGone, FileNotFoundError):
                out.append(record)
                continue
            date = int(st.st_mtime)
            found.append((record.uid, date))
            out.append(replace(record, internaldate=date))
        self.index.note_dates(name.imap(), found)
        return out

    # --- writing ---------------------------------------------------------------------
    def delete(self, name: FolderName) -> None:
        """DELETE: the directory, then the index's record of it (if it had one)."""
        self.folders.delete(name)
        with contextlib.suppress(NoSuchFolder):
            self.index.delete_folder(name.imap())

    def _info(self, path: Path, flags: Iterable[str]) -> str:
        flags = canonical_flags(flags)
        letters = system_letters(flags & SYSTEM_FLAGS)
        letters += keyword_letters(path, flags - SYSTEM_FLAGS)
        return "".join(sorted(letters))

    def append(
        self, name: FolderName, message: bytes, flags: Sequence[str], internaldate: int
    ) -> tuple[int, int]:
        """Store ``message`` (CRLF or LF) durably; (UIDVALIDITY, UID)."""
        path = self.folders.path(name)
        self.index.ensure_folder(name.imap())  # a folder never selected yet
        data = message.replace(b"\r\n", b"\n")
        info = self._info(path, flags)
        crlf = len(data) + data.count(b"\n")
        stem = f"{self._namer.unique()},S={len(data)},W={crlf}"
        filename = f"{stem}{INFO}{info}" if info else stem
        tmp = path / "tmp" / stem
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.utime(tmp, (internaldate, internaldate))
            sub = "cur" if info else "new"
            os.rename(tmp, path / sub / filename)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path / sub)
        quota.record(self.maildir, len(data), 1)
        key = name.imap()
        record = NewMessage(filename, canonical_flags(flags), internaldate, len(data))
        (uid,) = self.index.append(key, [record])
        state = self.index.folder(key)
        return (state.uidvalidity if state else 0), uid

    def store(
        self,
        name: FolderName,
        records: Sequence[MessageRecord],
        mode: StoreMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> StoreResult:
        """Flags in the index first, then in the file names."""
        path = self.folders.path(name)
        key = name.imap()
        result = self.index.store(key, (r.uid for r in records), mode, flags, unchanged_since)
        before = {r.uid: r for r in records}
        for new in result.changed:
            old = before.get(new.uid, new)
            wanted = self._info(path, new.flags)
            current = set(old.info)
            # Letters we do not map (P, unknown ones) are kept as found.
            ours = set(self._info(path, old.flags))
            add = "".join(sorted(set(wanted) - current))
            remove = "".join(sorted(ours - set(wanted)))
            if not add and not remove:
                continue
            subdir = "cur" if old.info or (path / "cur" / f"{old.stem}{INFO}").exists() else "new"
            filename = f"{old.stem}{INFO}{old.info}" if subdir == "cur" else old.stem
            try:
                _sub, now = change_flags(path, subdir, filename, add, remove)
            except MessageGone:
                continue  # expunged by someone else: the next refresh reports it
            self.index.note_info(key, new.uid, now.partition(INFO)[2])
        return result

    def expunge(self, name: FolderName, records: Sequence[MessageRecord]) -> ExpungeResult:
        """Remove the files, then the index entries."""
        path = self.folders.path(name)
        size = count = 0
        dirs: set[str] = set()
        for record in records:
            try:
                located = self._locate(path, record)
                os.unlink(located)
            except (MessageGone, FileNotFoundError):
                continue
            dirs.add(located.parent.name)
            size += record.size
            count += 1
        for sub in sorted(dirs):
            fsync_dir(path / sub)
        if count:
            quota.record(self.maildir, -size, -count)
        return self.index.expunge(name.imap(), (r.uid for r in records))

    def copy(
        self,
        source: FolderName,
        target: FolderName,
        records: Sequence[MessageRecord],
        *,
        move: bool = False,
    ) -> CopyResult:
        """COPY (link) or MOVE (rename) into ``target``; COPYUID's data."""
        src = self.folders.path(source)
        dst = self.folders.path(target)
        self.index.ensure_folder(target.imap())
        pairs: list[tuple[int, str]] = []
        size = 0
        for record in records:
            try:
                located = self._locate(src, record)
            except MessageGone:
                continue
            info = located.name.partition(INFO)[2]
            stem = self._namer.unique()
            sizes = record.stem.partition(",")[2]
            if sizes:
                stem += "," + sizes
            filename = f"{stem}{INFO}{info}" if info or located.parent.name == "cur" else stem
            sub = "cur" if INFO in filename else "new"
            try:
                if move:
                    os.rename(located, dst / sub / filename)
                else:
                    _link_or_copy(located, dst / sub / filename, dst / "tmp" / filename)
            except FileNotFoundError:
                continue  # removed meanwhile
            pairs.append((record.uid, filename))
            size += record.size
        for sub in ("new", "cur"):
            fsync_dir(dst / sub)
        if move:
            for sub in ("new", "cur"):
                fsync_dir(src / sub)
        elif pairs:
            quota.record(self.maildir, size, len(pairs))
        if move:
            return self.index.move(source.imap(), target.imap(), pairs)
        return self.index.copy(source.imap(), target.imap(), pairs)


def _read_file(path: str, expected: int, dir_fd: int | None = None) -> bytes:
    """The file's bytes; ``expected`` (the size the index holds) lets one
    read() get them all: a regular file reads short only at its end, so
    asking one octet more tells whether there is more."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        want = expected + 1
        chunks = [os.read(fd, want)]
        while len(chunks[-1]) == want:  # larger than the index said: read on
            want = 65536
            chunks.append(os.read(fd, want))
        return b"".join(chunks) if len(chunks) > 1 else chunks[0]
    finally:
        os.close(fd)


def _link_or_copy(source: Path, target: Path, staging: Path) -> None:
    """A hard link (the same inode: flags are in the name, so sharing it is
    safe); across file systems, a durable copy through ``tmp/``."""
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
    data = source.read_bytes()
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = source.stat()
    os.utime(staging, (st.st_atime, st.st_mtime))
    os.rename(staging, target)
