"""The durable outbound queue under ``settings.queue_dir``.

Layout (one flat directory, so one directory fsync covers every rename)::

    queue/<id>.msg      "postoffice-queue 1 <envelope JSON>\\n" + the message (LF form)
    queue/<id>.json     per-recipient state, once anything has changed
    queue/<id>.remove   a removal requested by ``queue remove`` during an attempt
    queue/tmp/          files being written (never acknowledged; cleared at start)
    queue/flush         ``queue flush`` asks the running server to retry everything now

A message is committed (the 250) when its ``.msg`` has been fsync'd, renamed
out of ``tmp/`` and the directory fsync'd.  The envelope (sender, recipients,
arrival time) never changes, so it travels in the first line of that one
file: committing costs one file fsync and a share of one directory fsync.
Commits are grouped (``DirectoryLane``): every message whose end of data
came while the previous group was being stored is written, fsync'd and
renamed in one trip to a worker thread, followed by one directory fsync for
the group, and only then is any of them acknowledged.  Finished messages
are unlinked through the same lane.
Every state change after that is a new ``.json`` written to ``tmp/``,
fsync'd and renamed over the old one (atomic), then the directory fsync'd.
A finished message is unlinked (``.json`` then ``.msg``) and the directory
fsync'd, so a power cut can never bring a delivered message back.

The server holds an ``flock`` on ``<id>.msg`` while it works on a message;
``queue remove`` takes the same lock, so the two never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import json
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from postoffice.delivery.content import MessageTraits, TraitScanner
from postoffice.mail.address import Address
from postoffice.mail.folding import LineFolder
from postoffice.storage.errors import DeliveryError, errno_fault
from postoffice.storage.safeio import fsync_dir, write_all

log = logging.getLogger("postoffice.queue")
_T = TypeVar("_T")

MAGIC = b"postoffice-queue 1 "
MAX_ENVELOPE_LINE = 1024 * 1024
SPILL_THRESHOLD = 64 * 1024  # bytes kept in memory before the message streams to disk
READ_CHUNK = 64 * 1024
FLUSH_FILE = "flush"
ADOPT_SUFFIX = ".adopt"  # <id>.adopt: queued by another process, deliver it
QUEUE_ID = re.compile(r"[0-9a-z]{6,40}(?:-[a-z0-9]{1,8})?")


class QueueError(DeliveryError):
    """The queue could not store or read a message; safe to show.  A
    DeliveryError: its ``fault`` decides the SMTP session's answer."""


class State(enum.StrEnum):
    QUEUED = "queued"  # not tried yet
    DEFERRED = "deferred"  # tried, failed temporarily; retried at next_try
    DELIVERED = "delivered"  # accepted by the next hop or a local mailbox
    FAILED = "failed"  # failed permanently; a DSN is owed to the sender
    BOUNCED = "bounced"  # failed, and the DSN is queued (or none is due: null sender)


PENDING = frozenset({State.QUEUED, State.DEFERRED})


@dataclass
class Recipient:
    address: Address
    state: State = State.QUEUED
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""  # the last reply (or connection error) text
    status: str = ""  # RFC 3463 status for a DSN, e.g. "5.1.1"
    remote: str = ""  # the host that gave last_error, if any
    smtp_reply: bool = False  # last_error is that host's SMTP reply
    last_attempt: float = 0.0

    @property
    def pending(self) -> bool:
        return self.state in PENDING

    def to_json(self) -> dict[str, Any]:
        return {
            "to": [self.address.local, self.address.domain],
            "state": self.state.value,
            "attempts": self.attempts,
            "next_try": self.next_try,
            "error": self.last_error,
            "status": self.status,
            "remote": self.remote,
            "smtp": self.smtp_reply,
            "last": self.last_attempt,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Recipient:
        local, domain = raw["to"]
        return cls(
            address=Address(str(local), str(domain)),
            state=State(raw["state"]),
            attempts=int(raw.get("attempts", 0)),
            next_try=float(raw.get("next_try", 0.0)),
            last_error=str(raw.get("error", "")),
            status=str(raw.get("status", "")),
            remote=str(raw.get("remote", "")),
            smtp_reply=bool(raw.get("smtp", False)),
            last_attempt=float(raw.get("last", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the message arrived with; written once, never changed."""

    queue_id: str
    sender: Address | None  # None: the null reverse-path (a bounce)
    recipients: tuple[Address, ...]
    created: float

    def header_line(self) -> bytes:
        raw = {
            "id": self.queue_id,
            "from": None if self.sender is None else [self.sender.local, self.sender.domain],
            "to": [[r.local, r.domain] for r in self.recipients],
            "created": self.created,
        }
        return MAGIC + json.dumps(raw, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Envelope:
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise QueueError("not a queue file")
        raw = json.loads(line[len(MAGIC) :])
        sender = None if raw["from"] is None else Address(*map(str, raw["from"]))
        return cls(
            queue_id=str(raw["id"]),
            sender=sender,
            recipients=tuple(Address(str(l_), str(d)) for l_, d in raw["to"]),
            created=float(raw["created"]),
        )


@dataclass
class QueueEntry:
    envelope: Envelope
    recipients: list[Recipient]
    body_offset: int  # where the message starts in the .msg file
    warned: bool = False  # a "delayed" DSN has been sent
    dsn_count: int = 0  # failure DSNs sent so far (names the next one's queue id)
    traits: MessageTraits | None = None  # cached; recomputed from the file after a restart
    state_on_disk: bool = False  # a .json may exist (loaded with one, or one was written)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    @property
    def done(self) -> bool:
        return not any(r.pending or r.state is State.FAILED for r in self.recipients)

    def next_due(self) -> float | None:
        times = [r.next_try for r in self.recipients if r.pending]
        return min(times) if times else None

    def state_json(self) -> bytes:
        raw = {
            "v": 1,
            "warned": self.warned,
            "dsn": self.dsn_count,
            "recipients": [r.to_json() for r in self.recipients],
        }
        return json.dumps(raw, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

    def apply_state(self, data: bytes) -> None:
        raw = json.loads(data)
        self.warned = bool(raw.get("warned", False))
        self.dsn_count = int(raw.get("dsn", 0))
        self.recipients = [Recipient.from_json(r) for r in raw["recipients"]]


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds, hex) and unguessable (random tail)."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(4)}"


def _tmp_suffix() -> str:
    """Tells apart two files being written for one queue id (O_EXCL guards
    them); not secret, so ``random`` rather than a getrandom(2) call."""
    return f"{random.getrandbits(32):08x}"


class DirSync:
    """Group commit for directory fsyncs: every caller waits for one fsync
    that *started after* its call, and callers that arrive while one runs
    share the next."""

    def __init__(self, path: Path, executor: Executor) -> None:
        self._path = path
        self._executor = executor
        self._next: asyncio.Future[None] | None = None
        self._running = False
        self._task: asyncio.Task[None] | None = None  # a strong reference while it runs

    async def sync(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiter = self._next
        if not self._running:
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._running = True
        await asyncio.shield(waiter)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(1_000_000):  # bounded; ends as soon as nobody waits
                waiter, self._next = self._next, None
                if waiter is None:
                    return
                try:
                    await loop.run_in_executor(self._executor, fsync_dir, self._path)
                except OSError as exc:
                    waiter.set_exception(QueueError(f"queue directory sync failed: {exc}"))
                else:
                    waiter.set_result(None)
        finally:
            self._running = False


class DirectoryLane:
    """Group commit for changes to the queue directory: one worker-thread
    trip per group.

    Every change (a new message finished and renamed in, a finished message
    unlinked, a state file replaced) that arrives while a group is being
    stored joins the next group.  The group's changes run in order in one
    worker thread, then the directory is fsync'd once; each caller gets its
    result only after that fsync, so a change is as durable as with an fsync
    of its own (a new message is acknowledged only then).  One thread trip
    per group instead of two per change keeps the event loop and the worker
    threads from handing the GIL back and forth at every step."""

    def __init__(self, path: Path, executor: Executor) -> None:
        self._path = path
        self._executor = executor
        self._waiting: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None  # the group being stored

    async def run(self, change: Callable[[], _T]) -> _T:
        """``change()`` in a worker thread, then the directory fsync'd; its
        result or its exception (OSError also when the directory fsync failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._waiting.append((change, future))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return await asyncio.shield(future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        group: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        try:
            for _ in range(1_000_000_000):  # bounded; ends as soon as nobody waits
                group, self._waiting = self._waiting, []
                if not group:
                    return
                changes = [change for change, _future in group]
                try:
                    results = await loop.run_in_executor(
                        self._executor, self._group_blocking, changes
                    )
                except Exception as exc:  # the executor is gone (shutdown)
                    results = [(False, exc)] * len(group)
                for (_change, future), (ok, value) in zip(group, results, strict=True):
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                group = []
        finally:
            self._task = None
            for _change, future in group + self._waiting:  # cancelled: nobody may hang
                if not future.done():
                    future.set_exception(QueueError("queue directory change interrupted"))
            self._waiting = []

    def _group_blocking(self, changes: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        for change in changes:
            try:
                results.append((True, change()))
            except Exception as exc:
                results.append((False, exc))
        if any(ok for ok, _value in results):
            try:
                fsync_dir(self._path)
            except OSError as exc:
                results = [(False, exc) if ok else (ok, value) for ok, value in results]
        return results


class QueueStore:
    """The files of the queue.  Blocking methods end in ``_blocking``; the
    CLI uses those directly, the server through its executor."""

    def __init__(self, queue_dir: Path, executor: Executor) -> None:
        self.dir = queue_dir
        self.tmp = queue_dir / "tmp"
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

    # --- writing new messages ----------------------------------------------------
    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        on_commit: Callable[[QueueEntry], Awaitable[None] | None] | None = None,
    ) -> QueueWriter:
        if not recipients:
            raise ValueError("a queued message needs at least one recipient")
        envelope = Envelope(
            queue_id=queue_id or new_queue_id(),
            sender=sender,
            recipients=tuple(dict.fromkeys(recipients)),
            created=time.time(),
        )
        return QueueWriter(self, envelope, on_commit)

    async def change(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` (a change to the queue directory) in a worker thread, made
        durable with a directory fsync shared with other changes (DirectoryLane)."""
        return await self._lane.run(fn)

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def sync_dir(self) -> None:
        await self._dirsync.sync()

    # --- state changes -------------------------------------------------------------
    def _write_state_blocking(self, queue_id: str, data: bytes) -> None:
        tmp = self.tmp / f"{queue_id}.json.{_tmp_suffix()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path(queue_id))

    async def save_state(self, entry: QueueEntry) -> None:
        """Make ``entry``'s recipient states durable."""
        entry.state_on_disk = True
        await self.run_blocking(self._write_state_blocking, entry.queue_id, entry.state_json())
        await self.sync_dir()

    def _unlink_blocking(self, queue_id: str) -> None:
        for path in (
            self.state_path(queue_id),
            self.msg_path(queue_id),
            self.tombstone_path(queue_id),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def delete(self, queue_id: str) -> None:
        """Remove a finished message for good."""
        await self.run_blocking(self._unlink_blocking, queue_id)
        await self.sync_dir()

    # --- reading ------------------------------------------------------------------
    def read_envelope_blocking(self, path: Path) -> tuple[Envelope, int]:
        with open(path, "rb") as fh:
            line = fh.readline(MAX_ENVELOPE_LINE)
        try:
            return Envelope.parse(line), len(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise QueueError(f"{path.name}: bad envelope: {exc}") from None

    def load_blocking(self, queue_id: str) -> QueueEntry | None:
        """The entry as on disk now; None if it is gone."""
        try:
            envelope, offset = self.read_envelope_blocking(self.msg_path(queue_id))
        except FileNotFoundError:
            return None
        entry = QueueEntry(
            envelope=envelope,
            recipients=[Recipient(a, next_try=envelope.created) for a in envelope.recipients],
            body_offset=offset,
        )
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
                log.info("queue %s: removed (requested by queue remove)", queue_id)
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

    def scan_traits_blocking(self, queue_id: str, offset: int) -> MessageTraits:
        scanner = TraitScanner()
        with open(self.msg_path(queue_id), "rb") as fh:
            fh.seek(offset)
            for chunk in iter(lambda: fh.read(READ_CHUNK), b""):
                scanner.feed(chunk)
        return scanner.traits()

    def open_message_blocking(self, entry: QueueEntry) -> Any:
        fh = open(self.msg_path(entry.queue_id), "rb")  # noqa: SIM115 - caller closes
        fh.seek(entry.body_offset)
        return fh

    def read_head_blocking(self, entry: QueueEntry, limit: int) -> bytes:
        with self.open_message_blocking(entry) as fh:
            data: bytes = fh.read(limit)
            return data

    # --- locking against the CLI ------------------------------------------------
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

    def begin_blocking(self, queue_id: str) -> tuple[str, int | None]:
        """Start work on a message, in one trip to the worker thread:
        ("ok", lock fd), ("busy", None) while the CLI holds it, ("gone", None)
        if it was removed, ("removed", None) if a removal request was applied."""
        fd = self.try_lock_blocking(queue_id)
        if fd is None:
            return ("busy", None) if self.msg_path(queue_id).exists() else ("gone", None)
        if self.tombstone_path(queue_id).exists():
            try:
                self._unlink_blocking(queue_id)
            finally:
                self.unlock_blocking(fd)
            return "removed", None
        return "ok", fd

    def begin_and_read_blocking(
        self, entry: QueueEntry, size: int
    ) -> tuple[str, int | None, tuple[Any, bytes] | None]:
        """``begin_blocking``, and on "ok" a message shorter than ``size``
        read whole, as ``open_and_read_blocking`` gives it (None, content),
        from the locked descriptor: one worker-thread trip, one read.  A
        longer message gives None (read it with ``open_and_read_blocking``)."""
        status, fd = self.begin_blocking(entry.queue_id)
        if fd is None:
            return status, fd, None
        try:
            data = os.pread(fd, size, entry.body_offset)
        except OSError:
            return status, fd, None  # read again when needed; that reports the error
        return status, fd, ((None, data) if len(data) < size else None)

    def end_blocking(
        self, queue_id: str, fd: int, state: bytes | None, *, has_state: bool = True
    ) -> bool:
        """Finish work on a message: write its new ``state``, or delete it
        when ``state`` is None, then unlock.  A removal requested meanwhile
        wins: the message is deleted and True returned.  ``has_state`` False
        (no ``.json`` was ever written) spares the unlink of one.  The caller
        makes the change durable with ``sync_dir``, or runs this through
        ``change``."""
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

    def open_and_read_blocking(self, entry: QueueEntry, size: int) -> tuple[Any, bytes]:
        """Open the message and read its first ``size`` bytes; a message that
        fits is closed already (the file object is then None)."""
        fh = self.open_message_blocking(entry)
        try:
            data: bytes = fh.read(size)
        except BaseException:
            fh.close()
            raise
        if len(data) < size:
            fh.close()
            return None, data
        return fh, data

    @staticmethod
    def read_more_blocking(fh: Any, size: int) -> bytes:
        data: bytes = fh.read(size)
        if len(data) < size:
            fh.close()
        return data

    # --- administration (CLI; works while the server runs) ---------------------------
    def remove_blocking(self, queue_id: str) -> str:
        """'removed', 'requested' (a delivery attempt holds it) or 'missing'."""
        if not QUEUE_ID.fullmatch(queue_id) or not self.msg_path(queue_id).exists():
            return "missing"
        fd = self.try_lock_blocking(queue_id)
        if fd is None:
            if not self.msg_path(queue_id).exists():
                return "missing"
            tomb = self.tombstone_path(queue_id)
            tomb.write_bytes(b"")
            fsync_dir(self.dir)
            return "requested"
        try:
            self._unlink_blocking(queue_id)
            fsync_dir(self.dir)
        finally:
            self.unlock_blocking(fd)
        return "removed"

    def request_flush_blocking(self) -> Path:
        self.ensure_dirs()
        path = self.dir / FLUSH_FILE
        path.write_bytes(b"")
        return path

    def request_adoption_blocking(self, queue_id: str) -> None:
        """From a process that queues but does not deliver (an extra smtp
        process): ask the delivering server to take ``queue_id`` on."""
        (self.dir / f"{queue_id}{ADOPT_SUFFIX}").touch()

    def take_adoption_requests_blocking(self) -> list[str]:
        """The queue ids other processes asked this server to deliver (once)."""
        ids = []
        for path in self.dir.glob(f"*{ADOPT_SUFFIX}"):
            with contextlib.suppress(OSError):
                os.unlink(path)
                queue_id = path.name[: -len(ADOPT_SUFFIX)]
                if QUEUE_ID.fullmatch(queue_id):
                    ids.append(queue_id)
        return ids

    def take_flush_request_blocking(self) -> bool:
        try:
            os.unlink(self.dir / FLUSH_FILE)
        except FileNotFoundError:
            return False
        return True

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


class QueueWriter:
    """One message on its way into the queue (a ``HeadedSink``,
    storage/sink.py).  ``write`` takes LF-form content; ``commit`` makes it
    durable and returns the queue id.

    Lines longer than SMTP allows are folded on the way in (mail/folding.py),
    so the queue holds the message as it will go on the wire: its traits
    (SIZE) are exact and a DKIM signature made at commit covers that form.
    """

    def __init__(
        self,
        store: QueueStore,
        envelope: Envelope,
        on_commit: Callable[[QueueEntry], Awaitable[None] | None] | None = None,
    ) -> None:
        self.store = store
        self.envelope = envelope
        self.on_commit = on_commit
        self._header = envelope.header_line()
        self._buffer = bytearray(self._header)
        self._scanner = TraitScanner()
        self._folder = LineFolder()
        self._fd: int | None = None
        self._tmp_path: Path | None = None
        self._closed = False

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    async def write(self, data: bytes, newlines: int = -1) -> None:
        """Add content; ``newlines`` is not needed: the folding may add some."""
        if self._closed:
            raise RuntimeError("writer already committed or discarded")
        data = self._folder.feed(data)
        self._scanner.feed(data)
        self._buffer += data
        if len(self._buffer) >= SPILL_THRESHOLD:
            chunk = bytes(self._buffer)
            self._buffer.clear()
            await self.store.run_blocking(self._write_blocking, chunk)

    def _write_blocking(self, chunk: bytes) -> None:
        if self._fd is None:
            self._tmp_path = self.store.tmp / f"{self.queue_id}.{_tmp_suffix()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                self._fd = os.open(self._tmp_path, flags, 0o600)
            except FileNotFoundError:  # tmp/ removed under us: make it again
                self.store.ensure_dirs()
                self._fd = os.open(self._tmp_path, flags, 0o600)
        write_all(self._fd, chunk)

    def finish_blocking(self, chunk: bytes, head: Callable[[bytes], bytes] | None = None) -> None:
        """Write ``chunk`` (with ``head(chunk)`` first, if given), fsync and
        rename into the queue; the caller fsyncs the directory.  With ``head``,
        ``chunk`` is the whole message, not yet folded: it is folded first,
        so ``head`` (the DKIM signer) sees what will be sent."""
        try:
            if head is not None:
                chunk = self._folder.feed(chunk)
                top = head(chunk)
                self._scanner.feed(top)
                self._scanner.feed(chunk)
                chunk = self._header + top + chunk
            self._write_blocking(chunk)
            assert self._fd is not None and self._tmp_path is not None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp_path, self.store.msg_path(self.queue_id))
            self._tmp_path = None
        except BaseException:
            self._discard_blocking()
            raise

    def _discard_blocking(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_path)
            self._tmp_path = None

    async def commit(self) -> str:
        """Durable (file and directory fsync'd) before this returns; raise QueueError."""
        if self._closed:
            raise RuntimeError("writer already committed or discarded")
        self._closed = True
        chunk = bytes(self._buffer)
        self._buffer.clear()
        return await self._commit(chunk, None)

    async def commit_with_head(self, content: bytes, head: Callable[[bytes], bytes]) -> str:
        """Queue ``content`` (nothing may have been written before) with
        ``head(content)`` on top of it, like ``write(head(content))``,
        ``write(content)``, ``commit()``; but ``head`` runs in the worker
        thread that stores the message (DKIM signing: one thread trip, not two)."""
        if self._closed or self._fd is not None or len(self._buffer) != len(self._header):
            raise RuntimeError("commit_with_head needs a fresh writer")
        self._closed = True
        self._buffer.clear()
        return await self._commit(content, head)

    async def _commit(self, chunk: bytes, head: Callable[[bytes], bytes] | None) -> str:
        try:
            await self.store.change(functools.partial(self.finish_blocking, chunk, head))
        except OSError as exc:
            raise QueueError(
                f"cannot queue message: {exc.strerror or exc}",
                fault=errno_fault(exc.errno),
            ) from exc
        entry = QueueEntry(
            envelope=self.envelope,
            recipients=[
                Recipient(a, next_try=self.envelope.created) for a in self.envelope.recipients
            ],
            body_offset=len(self._header),
            traits=self._scanner.traits(),
        )
        if self.on_commit is not None:
            result = self.on_commit(entry)
            if result is not None:
                await result
        return self.queue_id

    async def discard(self) -> None:
        """Abandon the message (rejected, or the client went away)."""
        self._closed = True
        self._buffer.clear()
        if self._fd is not None or self._tmp_path is not None:
            await self.store.run_blocking(self._discard_blocking)
