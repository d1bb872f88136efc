"""The files of the queue: load, recover, claim and release, remove, list.

Blocking methods end in ``_blocking``; the CLI calls those directly, the
server runs them in its worker threads (``run_blocking``) or calls the
async ones.  The server works on a message only while it holds a
``ClaimedMessage``: the message's ``flock``, which ``queue remove`` takes
too, so the two never race.  ``release`` gives the claim back: it writes
the recipients' new state, or deletes the message when nothing is owed
any more (or when ``queue remove`` asked meanwhile), through the directory
lane, so it is durable before the server acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from postoffice import maillog
from postoffice.delivery.content import MessageTraits, TraitScanner
from postoffice.delivery.queue.lane import DirectoryLane, DirSync
from postoffice.delivery.queue.message import READ_CHUNK, QueuedMessage, open_body_blocking
from postoffice.delivery.queue.records import (
    QUEUE_ID,
    QueueEntry,
    QueueError,
    StoredEnvelope,
    new_queue_id,
)
from postoffice.delivery.queue.requests import QueueRequests
from postoffice.delivery.queue.writer import OnCommit, QueueWriter, tmp_suffix
from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn
from postoffice.storage.safeio import fsync_dir, write_all

log = logging.getLogger("postoffice.queue")
_T = TypeVar("_T")

MAX_ENVELOPE_LINE = 1024 * 1024


class Unclaimed(enum.Enum):
    """Why ``claim`` gave no claim."""

    BUSY = "busy"  # `queue remove` holds the lock right now: try again shortly
    GONE = "gone"  # removed by `queue remove` (just now, durably, or before)


class Released(enum.Enum):
    """What ``ClaimedMessage.release`` did with the message."""

    KEPT = "kept"  # recipients are pending: their new state is written
    FINISHED = "finished"  # nothing is owed any more: deleted
    REMOVED = "removed"  # `queue remove` asked during the attempt: deleted


class Removal(enum.Enum):
    """What ``remove_blocking`` (``queue remove``) did."""

    REMOVED = "removed"
    REQUESTED = "requested"  # a delivery attempt holds it: removed when that ends
    MISSING = "missing"


class QueueStore:
    def __init__(self, queue_dir: Path, executor: Executor) -> None:
        self.dir = queue_dir
        self.tmp = queue_dir / "tmp"
        self.requests = QueueRequests(queue_dir)
        self._executor = executor
        self._dirsync = DirSync(queue_dir, executor)
        self._lane = DirectoryLane(queue_dir, executor)
        # tmp/ files older than this are a previous run's leftovers; newer
        # ones may be messages this process is receiving right now.
        self._started = time.time() - 1.0

    # --- paths ------------------------------------------------------------------
    def msg_path(self, queue_id: str) -> Path:
        return self.dir / f"{queue_id}.msg"

    def state_path(self, queue_id: str) -> Path:
        return self.dir / f"{queue_id}.json"

    def tombstone_path(self, queue_id: str) -> Path:
        return self.dir / f"{queue_id}.remove"

    def ensure_dirs(self) -> None:
        os.makedirs(self.tmp, mode=0o700, exist_ok=True)

    async def run_blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- writing new messages ----------------------------------------------------
    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        on_commit: OnCommit | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> QueueWriter:
        """``dsn``, ``rcpt_dsn``: the DSN parameters the message came with (RFC 3461)."""
        if not recipients:
            raise ValueError("a queued message needs at least one recipient")
        unique = tuple(dict.fromkeys(recipients))
        envelope = StoredEnvelope(
            queue_id=queue_id or new_queue_id(),
            sender=sender,
            recipients=unique,
            created=time.time(),
            dsn=dsn or MessageDsn(),
            rcpt_dsn=tuple(rcpt_dsn.get(r, RecipientDsn()) for r in unique) if rcpt_dsn else (),
        )
        return QueueWriter(
            envelope,
            tmp_dir=self.tmp,
            path=self.msg_path(envelope.queue_id),
            lane=self._lane,
            executor=self._executor,
            on_commit=on_commit,
        )

    # --- state changes -------------------------------------------------------------
    def _write_state_blocking(self, queue_id: str, data: bytes) -> None:
        tmp = self.tmp / f"{queue_id}.json.{tmp_suffix()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path(queue_id))

    def _unlink_blocking(self, queue_id: str) -> None:
        for path in (
            self.state_path(queue_id),
            self.msg_path(queue_id),
            self.tombstone_path(queue_id),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # --- reading ------------------------------------------------------------------
    def _read_envelope_blocking(self, path: Path) -> tuple[StoredEnvelope, int]:
        with open(path, "rb") as fh:
            line = fh.readline(MAX_ENVELOPE_LINE)
        try:
            return StoredEnvelope.parse(line), len(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise QueueError(f"{path.name}: bad envelope: {exc}") from None

    def load_blocking(self, queue_id: str) -> QueueEntry | None:
        """The entry as on disk now; None if it is gone."""
        try:
            envelope, offset = self._read_envelope_blocking(self.msg_path(queue_id))
        except FileNotFoundError:
            return None
        entry = QueueEntry.new(envelope, offset)
        try:
            data = self.state_path(queue_id).read_bytes()
        except FileNotFoundError:
            return entry
        entry.state_on_disk = True
        try:
            entry.apply_state(data)
        except (ValueError, KeyError, TypeError) as exc:
            # Cannot happen with atomic renames short of disk corruption; the
            # envelope is still good, so retry everyone rather than lose mail.
            log.warning("queue %s: unreadable state (%s); retrying all recipients", queue_id, exc)
        return entry

    def ids_blocking(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(
            p.name[:-4] for p in self.dir.glob("*.msg") if QUEUE_ID.fullmatch(p.name[:-4])
        )

    def recover_blocking(self) -> list[QueueEntry]:
        """At server start: clear ``tmp/``, drop orphans, apply pending
        removals, and load every queued message."""
        self.ensure_dirs()
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < self._started:
                    os.unlink(leftover)
        ids = set(self.ids_blocking())
        for path in list(self.dir.glob("*.json")) + list(self.dir.glob("*.remove")):
            stem = path.name.rsplit(".", 1)[0]
            if stem not in ids:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        entries: list[QueueEntry] = []
        for queue_id in sorted(ids):
            if self.tombstone_path(queue_id).exists():
                self._unlink_blocking(queue_id)
                maillog.removed(queue_id)
                continue
            try:
                entry = self.load_blocking(queue_id)
            except (QueueError, OSError) as exc:
                log.error("queue %s: cannot load, left in place: %s", queue_id, exc)
                continue
            if entry is not None:
                entries.append(entry)
        fsync_dir(self.dir)
        return entries

    def open_message_blocking(self, entry: QueueEntry) -> BinaryIO:
        """The message (without its envelope line); the caller closes it."""
        return open_body_blocking(self.msg_path(entry.queue_id), entry.body_offset)

    def _scan_traits_blocking(self, entry: QueueEntry) -> MessageTraits:
        scanner = TraitScanner()
        with self.open_message_blocking(entry) as fh:
            for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
                scanner.feed(chunk)
        return scanner.traits()

    def _read_head_blocking(self, entry: QueueEntry, limit: int) -> bytes:
        with self.open_message_blocking(entry) as fh:
            return fh.read(limit)

    # --- claims (the lock the CLI's `queue remove` takes too) ----------------------
    def try_lock_blocking(self, queue_id: str) -> int | None:
        """An fd holding an exclusive flock on the message, or None if the
        message is gone or someone else holds the lock."""
        try:
            fd = os.open(self.msg_path(queue_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # removed between open and lock
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock_blocking(fd: int) -> None:
        os.close(fd)  # closing drops the flock

    async def claim(self, entry: QueueEntry) -> ClaimedMessage | Unclaimed:
        """Start work on ``entry``: lock it and, if it is short, read it whole
        from the locked descriptor, in one worker-thread trip."""
        lock, whole = await self.run_blocking(self._claim_blocking, entry, READ_CHUNK)
        if isinstance(lock, Unclaimed):
            return lock
        return ClaimedMessage(self, entry, lock, whole)

    def _claim_blocking(self, entry: QueueEntry, size: int) -> tuple[int | Unclaimed, bytes | None]:
        """(the lock's fd, the message if shorter than ``size``), or why not.
        A removal requested while nobody held the lock is carried out here."""
        queue_id = entry.queue_id
        fd = self.try_lock_blocking(queue_id)
        if fd is None:
            busy = self.msg_path(queue_id).exists()
            return (Unclaimed.BUSY if busy else Unclaimed.GONE), None
        if self.tombstone_path(queue_id).exists():
            try:
                self._unlink_blocking(queue_id)
            finally:
                self.unlock_blocking(fd)
            fsync_dir(self.dir)
            return Unclaimed.GONE, None
        try:
            data = os.pread(fd, size, entry.body_offset)
        except OSError:
            return fd, None  # read again when needed; that reports the error
        return fd, (data if len(data) < size else None)

    def _release_blocking(
        self, queue_id: str, fd: int, state: bytes | None, has_state: bool
    ) -> bool:
        """Finish work on a message: write its new ``state``, or delete it
        when ``state`` is None, then unlock.  A removal requested meanwhile
        wins: the message is deleted and True returned.  ``has_state`` False
        (no ``.json`` was ever written) spares the unlink of one.  Run
        through the lane, which makes the change durable."""
        try:
            if self.tombstone_path(queue_id).exists():
                self._unlink_blocking(queue_id)
                return True
            if state is None:
                # No tombstone (just looked): the state file, if any, then the message.
                paths = (self.state_path(queue_id),) if has_state else ()
                for path in (*paths, self.msg_path(queue_id)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            else:
                self._write_state_blocking(queue_id, state)
            return False
        finally:
            self.unlock_blocking(fd)

    # --- administration (CLI; works while the server runs) ---------------------------
    def remove_blocking(self, queue_id: str) -> Removal:
        """``queue remove``: at once, or when the delivery attempt holding it ends."""
        if not QUEUE_ID.fullmatch(queue_id) or not self.msg_path(queue_id).exists():
            return Removal.MISSING
        fd = self.try_lock_blocking(queue_id)
        if fd is None:
            if not self.msg_path(queue_id).exists():
                return Removal.MISSING
            tomb = self.tombstone_path(queue_id)
            tomb.write_bytes(b"")
            fsync_dir(self.dir)
            return Removal.REQUESTED
        try:
            self._unlink_blocking(queue_id)
            fsync_dir(self.dir)
        finally:
            self.unlock_blocking(fd)
        return Removal.REMOVED

    def entries_blocking(self) -> Iterator[tuple[QueueEntry, int]]:
        """Every queued message with its size, for ``queue list``."""
        for queue_id in self.ids_blocking():
            try:
                entry = self.load_blocking(queue_id)
                size = self.msg_path(queue_id).stat().st_size
            except (QueueError, OSError):
                continue
            if entry is not None:
                yield entry, size - entry.body_offset


class ClaimedMessage:
    """A queued message this process works on, holding its lock until
    ``release`` (or ``unlock``, after an error: then nothing changes)."""

    def __init__(
        self, store: QueueStore, entry: QueueEntry, lock: int, whole: bytes | None
    ) -> None:
        self.entry = entry
        self._store = store
        self._lock: int | None = lock
        self._whole = whole  # the message, read with the lock, for the first reader

    @property
    def locked(self) -> bool:
        return self._lock is not None

    async def traits(self) -> MessageTraits:
        """The message's traits (SIZE, 8BITMIME...): kept from its commit,
        or read from the file once after a restart."""
        entry = self.entry
        if entry.traits is None:
            entry.traits = await self._store.run_blocking(self._store._scan_traits_blocking, entry)
        return entry.traits

    def message(self, traits: MessageTraits) -> QueuedMessage:
        """The message for one courier; the first gets what was read with the lock."""
        whole, self._whole = self._whole, None
        store, entry = self._store, self.entry
        return QueuedMessage(
            store.msg_path(entry.queue_id),
            entry.body_offset,
            traits,
            store._executor,
            whole,
            dsn=entry.envelope.dsn,
            rcpt_dsn={r.address: r.dsn for r in entry.recipients if r.dsn.given},
        )

    async def read_head(self, limit: int) -> bytes:
        """The first ``limit`` octets of the message (a DSN quotes its header)."""
        return await self._store.run_blocking(self._store._read_head_blocking, self.entry, limit)

    async def save(self) -> None:
        """Make the recipients' states durable now; the claim goes on."""
        entry, store = self.entry, self._store
        entry.state_on_disk = True
        await store.run_blocking(store._write_state_blocking, entry.queue_id, entry.state_json())
        await store._dirsync.sync()

    async def release(self) -> Released:
        """End the claim: write the recipients' states, or delete the message
        once nothing is owed; durable (directory fsync'd) when this returns."""
        entry, store = self.entry, self._store
        if self._lock is None:
            raise RuntimeError("claim already released")
        state = None if entry.done else entry.state_json()
        has_state = entry.state_on_disk
        if state is not None:
            entry.state_on_disk = True
        lock, self._lock = self._lock, None
        release = functools.partial(store._release_blocking, entry.queue_id, lock, state, has_state)
        if await store._lane.run(release):
            return Released.REMOVED
        return Released.FINISHED if state is None else Released.KEPT

    async def unlock(self) -> None:
        """Give the claim up and change nothing (work on it failed)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            await self._store.run_blocking(self._store.unlock_blocking, lock)
