"""Maildir mailboxes: where they live, how files are named, and durable delivery.

Layout (SPEC): ``mail_dir/<domain>/<localpart>/{tmp,new,cur}``; ``domain``
and ``localpart`` come only from ``parse_mailbox`` (IDNA A-labels, the
account alphabet), and ``mailbox_path`` checks again, so no client string
can name a path outside ``mail_dir``.

Files are stored with LF line endings, like Postfix's and Dovecot's.  Names
follow the Dovecot convention so any Maildir reader understands them::

    <secs>.M<usecs>P<pid>Q<seq>R<rand>.<host>,S=<octets>,W=<crlf octets>[:2,<flags>]

``S=`` is the file size and ``W=`` the size with CRLF line endings, which is
exactly what POP3 LIST must report: POP3 needs no ``stat`` or read to list.

Small messages (held in memory, the common case) go through the delivery
journal once ``recover`` has opened it (``storage/write_behind.py``): durable
after one flush of the journal, their files written to tmp/ and renamed into
``new/`` before the 250 and flushed in the background.  Large messages
(streamed to tmp/ while they arrive) take the Maildir protocol directly:
write to tmp, fsync, link/rename into ``new/``, fsync ``new/``.  File fsyncs
of concurrent sessions run in parallel threads (the file system merges them
into shared journal commits); the publication is group-committed: the
messages whose files became durable while one batch was being renamed and
its directories fsync'd form the next batch, with one directory fsync each.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from postoffice.mail.address import Address, AddressError, mailbox_local_part, normalise_domain
from postoffice.storage import quota
from postoffice.storage.errors import DeliveryError, StorageFault, errno_fault
from postoffice.storage.journal import SEGMENT_SIZE, SEGMENTS, Journal, JournalError
from postoffice.storage.safeio import fsync_dir, link_or_copy, writev_all
from postoffice.storage.write_behind import WriteBehind

log = logging.getLogger("postoffice.maildir")

SUBDIRS = ("tmp", "new", "cur")
# Below this a message stays in memory until its commit; above, it is streamed
# to its tmp/ file as it arrives, in writes of this size.
SPILL_THRESHOLD = 256 * 1024

_SIZE_FIELDS = re.compile(r",([SW])=(\d+)")


# A mailbox whose delivery failed (not for a full disk: a root-owned tmp/, a
# file where new/ should be) is refused at RCPT (450 4.2.0) for this long, so
# the other recipients of a message are not held up with it; then tried again.
UNAVAILABLE_SECONDS = 60.0


def mailbox_path(mail_dir: Path, mailbox: Address) -> Path:
    """The Maildir of ``mailbox``; raise AddressError if it would be unsafe."""
    local = mailbox_local_part(mailbox.local)
    domain = normalise_domain(mailbox.domain)
    if domain.startswith("[") or local != mailbox.local.lower():
        raise AddressError("not a mailbox address")
    path = mail_dir / domain / local
    # Belt and braces: both parts are single safe components by construction.
    if path.parent.parent != mail_dir or "/" in local or "/" in domain:
        raise AddressError("unsafe mailbox path")
    return path


def ensure_maildir(path: Path) -> None:
    """Create ``path/{tmp,new,cur}`` (mode 0700) if missing.  Blocking.

    New directories are made durable (each parent fsync'd), so the mailbox of
    a first delivery cannot vanish in a crash after its 250.
    """
    if all((path / sub).is_dir() for sub in SUBDIRS):
        return
    missing = [p for p in (path.parent, path) if not p.is_dir()]
    for sub in SUBDIRS:
        os.makedirs(path / sub, mode=0o700, exist_ok=True)
    for created in (*missing, path):
        fsync_dir(created)
        fsync_dir(created.parent)


def name_sizes(stem: str) -> tuple[str, dict[str, int]]:
    """The base of a name without its ``:2,`` info and its ``S=``/``W=`` sizes
    (a POP3 login runs this for every message: a dict, no object)."""
    base, comma, _rest = stem.partition(",")
    if not comma:
        return base, {}
    return base, {key: int(value) for key, value in _SIZE_FIELDS.findall(stem)}


_ARRIVAL = re.compile(r"(\d{1,18})(?:\.M(\d{1,9}))?(?!\d)")


def arrival_key(name: str) -> tuple[int, int, str]:
    """Sort key putting Maildir names in delivery order.

    Names start with the delivery time in seconds, and ours and Dovecot's go
    on with ``.M<microseconds>`` (``_Namer.unique``): sort by both, then by
    name; a name with no time prefix sorts first, by name.
    """
    m = _ARRIVAL.match(name)
    return (int(m[1]), int(m[2] or 0), name) if m else (0, 0, name)


def _arrival_number(name: str) -> int:
    # (seconds, microseconds) as one int: microseconds have at most 9 digits.
    m = _ARRIVAL.match(name)
    if m is None:
        return 0
    secs, micros = m.groups("0")
    return int(secs) * 1_000_000_000 + int(micros)


def arrival_order(names: Iterable[str]) -> list[str]:
    """``names`` sorted by ``arrival_key``, faster: a first sync of a
    100,000-file folder sorts them all.  A plain sort by name (in C), then
    a stable sort by one int each; tuple keys cost twice as much."""
    ordered = sorted(names)
    ordered.sort(key=_arrival_number)
    return ordered


class _Namer:
    """Unique names per the Maildir spec: time, microseconds, pid, counter,
    random, host (with '/' and ':' escaped as the spec asks)."""

    def __init__(self, hostname: str | None = None) -> None:
        host = hostname or socket.gethostname() or "localhost"
        self.host = host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
        self.counter = itertools.count(1)
        self.pid = os.getpid()  # a syscall each time otherwise (glibc caches no pid)

    def unique(self) -> str:
        # The random part only keeps names apart across restarts with a reused
        # pid; it is not a secret, so ``random`` (no syscall) serves.
        now = time.time()
        secs = int(now)
        usecs = int((now - secs) * 1_000_000)
        return (
            f"{secs}.M{usecs}P{self.pid}Q{next(self.counter)}"
            f"R{random.getrandbits(32):08x}.{self.host}"
        )


# The one namer, public for IMAP APPEND/COPY (storage/imap_mailbox.py).
Namer = _Namer


@dataclass
class _Published:
    """A message whose file is fsync'd in tmp/, waiting for its group commit."""

    writer: DeliveryWriter
    tmp_path: Path
    result: list[Path] | DeliveryError | None = None


# Threads that fsync message files.  fsyncs running at the same time share
# journal commits in the file system (ext4, xfs), so parallel sessions cost
# about one disk flush per batch instead of one each; they are blocked in
# the kernel, not holding the GIL.
FSYNC_THREADS = 16


@dataclass(frozen=True, slots=True)
class DeliveryFacts:
    """Whom a message to INBOX (or to the folder the filters chose) is for,
    as ``after_delivery`` needs it."""

    mailboxes: tuple[Address, ...]
    # The RCPT TO each mailbox came from, same order (alice+lists@, an alias):
    # Sieve's envelope test reads these (RFC 5228 §5.4, RFC 5233).
    originals: tuple[Address, ...]
    # Where the stored files are and a script's keep leaves them: "INBOX",
    # or "Junk" (spam, quarantine) or a filter's folder.
    keep_folder: str = "INBOX"


class Prepared(Protocol):
    """What ``after_delivery`` decided from the content before the store."""

    @property
    def moves(self) -> bool:
        """The stored files will be moved or removed: the writer then skips
        the journal, whose recovery would bring back a copy in ``new/``."""
        ...


class AfterDelivery(Protocol):
    """Runs once a message is durably in its mailboxes (Sieve,
    delivery/sieve.py): may move each file on and returns where each is now.

    ``prepare`` sees a small message's writer before it is stored, so the
    decision is made once and the store knows whether the file will stay
    where it is put; ``__call__`` gets the stored files (one per mailbox, in
    ``facts.mailboxes`` order) and that decision, or None (a large message:
    it decides from the files)."""

    async def prepare(self, writer: DeliveryWriter) -> Prepared | None:
        """Called for a writer with ``facts`` whose content is held in memory."""
        ...

    async def __call__(
        self, facts: DeliveryFacts, paths: list[Path], prepared: Prepared | None
    ) -> list[Path]: ...


def delivery_facts(
    mailboxes: Sequence[Address],
    originals: Mapping[Address, Address] | None = None,
    keep_folder: str = "INBOX",
) -> DeliveryFacts:
    """Facts for ``mailboxes`` (distinct), each original defaulting to itself."""
    given = originals or {}
    unique = tuple(dict.fromkeys(mailboxes))
    return DeliveryFacts(unique, tuple(given.get(m, m) for m in unique), keep_folder)


class MaildirStore:
    """Delivers messages into Maildirs under ``mail_dir`` with group commit.

    ``commit`` runs in one of the store's fsync threads: write what is left,
    fsync the tmp/ file (in parallel with other sessions' fsyncs), then
    publish: link/rename into ``new/`` and fsync each ``new/`` once for every
    message that reached this point while the previous publication ran
    (leader-based group commit: whoever holds the publish lock publishes
    everything queued so far).
    """

    def __init__(
        self,
        mail_dir: Path,
        executor: Executor,
        hostname: str | None = None,
        journal_dir: Path | None = None,
        *,
        journal_segment_size: int = SEGMENT_SIZE,
        journal_segments: int = SEGMENTS,
    ) -> None:
        self.mail_dir = mail_dir
        self._executor = executor
        self._namer = _Namer(hostname)
        self._known_dirs: set[Path] = set()
        self._paths: dict[Address, Path] = {}  # mailbox_path() results, bounded
        self._fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="postoffice-fsync")
        self._queue: list[_Published] = []
        self._queue_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        # Small messages go through the journal (storage/write_behind.py) once
        # ``recover`` has opened it; until then, and without one, all take the
        # path above.
        self._journal_dir = journal_dir
        self._journal_shape = (journal_segment_size, journal_segments)
        self._journal_lock = -1
        self._behind: WriteBehind | None = None
        # Mailbox path -> (until when, why): see UNAVAILABLE_SECONDS.  Event loop only.
        self._unavailable: dict[Path, tuple[float, str]] = {}
        # Set by the composition root when users may have Sieve scripts;
        # None keeps commit exactly as it was.
        self.after_delivery: AfterDelivery | None = None

    def unavailable(self, mailbox: Address) -> str | None:
        """Why deliveries to ``mailbox`` are failing just now, or None."""
        if not self._unavailable:
            return None
        try:
            path = self.path_for(mailbox)
        except AddressError:
            return None
        entry = self._unavailable.get(path)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._unavailable[path]
            return None
        return entry[1]

    def note_failure(self, mailboxes: Sequence[Path], exc: Exception) -> None:
        """A delivery to ``mailboxes`` failed: remember the mailbox it failed in."""
        if isinstance(exc, OSError):
            exc = _delivery_error(exc)
        if not isinstance(exc, DeliveryError) or exc.fault is StorageFault.NO_SPACE:
            return  # a full file system is not this mailbox's fault
        paths, why = exc.paths, str(exc)
        for mailbox in mailboxes:
            prefix = f"{mailbox}/"
            if any(p == str(mailbox) or p.startswith(prefix) for p in paths):
                log.error("mailbox %s unavailable: %s", mailbox, why)
                self._unavailable[mailbox] = (time.monotonic() + UNAVAILABLE_SECONDS, why)
                self._known_dirs.discard(mailbox)  # check its directories again next time

    def path_for(self, mailbox: Address) -> Path:
        path = self._paths.get(mailbox)
        if path is None:
            if len(self._paths) >= 10_000:
                self._paths.clear()
            path = self._paths[mailbox] = mailbox_path(self.mail_dir, mailbox)
        return path

    def writer(
        self, mailboxes: Sequence[Address], originals: Mapping[Address, Address] | None = None
    ) -> DeliveryWriter:
        """A writer for one message to ``mailboxes`` (at least one, all local);
        ``originals``: the RCPT TO address each came from, where it differs."""
        unique = tuple(dict.fromkeys(mailboxes))
        writer = self.writer_to(self.path_for(m) for m in unique)
        writer.facts = delivery_facts(unique, originals)
        return writer

    def writer_to(
        self, maildirs: Iterable[Path], *, folders: bool = False, facts: DeliveryFacts | None = None
    ) -> DeliveryWriter:
        """A writer into these Maildirs: mailboxes' roots, or with ``folders``
        their folders (Junk); those bypass the journal, whose records name
        only ``domain/local/new/`` (journal.check_target).  ``facts`` (one
        mailbox per Maildir, in order) lets ``after_delivery`` run for them."""
        paths = tuple(dict.fromkeys(maildirs))
        if not paths:
            raise ValueError("a delivery needs at least one mailbox")
        writer = DeliveryWriter(self, paths)
        writer.journaled = not folders
        if facts is not None and len(facts.mailboxes) == len(paths):
            writer.facts = facts
        return writer

    def recover(self) -> int:
        """Blocking, before serving: open the journal (if this store has one)
        and restore, durably, every acknowledged message it still holds; the
        number restored.  Another process holding the journal (a second server
        on this data directory) means this one delivers without it."""
        if self._journal_dir is None or self._behind is not None:
            return 0
        self._journal_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._journal_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("journal %s is in use by another process: not used", self._journal_dir)
            return 0
        size, count = self._journal_shape
        behind = WriteBehind(
            self.mail_dir,
            Journal(self._journal_dir, size, count),
            self._fsync_pool,
            self._namer.unique,
            self._ensure,
            _delivery_error,
        )
        try:
            restored = behind.recover()
        except (OSError, JournalError) as exc:
            # E.g. no room to restore: serve anyway, without the journal, and
            # leave its records for the next start to restore.
            log.error("journal %s cannot be used now: %s", self._journal_dir, exc)
            behind.close()
            os.close(fd)
            return 0
        except BaseException:
            behind.close()
            os.close(fd)
            raise
        self._journal_lock, self._behind = fd, behind
        return restored

    async def drain(self) -> None:
        """Wait (bounded) until journaled messages are all in their Maildirs durably."""
        if self._behind is not None:
            await self._behind.drain()

    def close(self) -> None:
        """Stop the threads and close the journal (after the last commit)."""
        if self._behind is not None:
            self._behind.close()
            self._behind = None
        if self._journal_lock >= 0:
            os.close(self._journal_lock)
            self._journal_lock = -1
        self._fsync_pool.shutdown(wait=True)

    async def _commit(self, writer: DeliveryWriter) -> list[Path]:
        behind = self._behind
        if behind is not None and writer.journaled and writer.in_memory and behind.fits(writer):
            return await behind.commit(writer)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._fsync_pool, self._commit_blocking, writer)

    # --- runs in the fsync threads -----------------------------------------------
    def _commit_blocking(self, writer: DeliveryWriter) -> list[Path]:
        try:
            for mailbox in writer.mailboxes:
                self._ensure(mailbox)
            item = _Published(writer, writer.finish_blocking())
        except OSError as exc:
            writer.discard_blocking()
            raise _delivery_error(exc) from exc
        with self._queue_lock:
            self._queue.append(item)
        with self._publish_lock:
            if item.result is None:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._publish(batch)
        assert item.result is not None
        if isinstance(item.result, DeliveryError):
            raise item.result
        return item.result

    def _publish(self, batch: list[_Published]) -> None:
        dirs_to_sync: set[Path] = set()
        for item in batch:
            try:
                item.result = self._link_one(item.writer, item.tmp_path, dirs_to_sync)
            except OSError as exc:
                item.result = _delivery_error(exc)
                continue
            for path in item.result:  # after the rename, as Maildir++ asks
                quota.record(path.parent.parent, item.writer.size, 1)
        # One fsync per new/ directory for the whole batch makes every rename
        # and link in it durable (the files' data was fsync'd before).
        failed_dirs: set[Path] = set()
        for d in dirs_to_sync:
            try:
                fsync_dir(d)
            except OSError:
                failed_dirs.add(d)
        for item in batch:
            result = item.result
            if isinstance(result, list) and any(p.parent in failed_dirs for p in result):
                item.result = DeliveryError("could not sync mailbox directory")

    def _ensure(self, mailbox: Path) -> None:
        if mailbox not in self._known_dirs:
            ensure_maildir(mailbox)
            self._known_dirs.add(mailbox)

    def _link_one(
        self, writer: DeliveryWriter, tmp_path: Path, dirs_to_sync: set[Path]
    ) -> list[Path]:
        final = f"{tmp_path.name},S={writer.size},W={writer.crlf_size}"
        stored: list[Path] = []
        try:
            for mailbox in writer.mailboxes[1:]:
                target = mailbox / "new" / (self._namer.unique() + final[final.index(",") :])
                link_or_copy(tmp_path, target, partial(_copy_durably, tmp_path))
                stored.append(target)
                dirs_to_sync.add(target.parent)
            first = writer.mailboxes[0] / "new" / final
            os.rename(tmp_path, first)
        except BaseException:
            for path in stored:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        stored.insert(0, first)
        dirs_to_sync.add(first.parent)
        return stored


class DeliveryWriter:
    """One message on its way into Maildirs.  ``write`` takes LF-form content;
    ``commit`` makes it durable in every mailbox and returns the files."""

    def __init__(self, store: MaildirStore, mailboxes: tuple[Path, ...]) -> None:
        self._store = store
        self.mailboxes = mailboxes
        # Content not yet on its way to tmp/, as it came (joined only once).
        self._parts: list[bytes] = []
        self._held = 0
        self._fd: int | None = None
        self._tmp_path: Path | None = None
        self.size = 0
        self.crlf_size = 0
        self.journaled = True  # small: through the journal (MaildirStore.writer_to)
        # Whom it is for when after_delivery is to run (``MaildirStore.writer``,
        # or ``writer_to`` given them); None for other folder deliveries.
        self.facts: DeliveryFacts | None = None
        # after_delivery's decision, when made before the commit (Sieve's
        # ereject check at SMTP time), so the script runs once.
        self.prepared: Prepared | None = None
        # The spill being written: one at a time, in order, while DATA goes on.
        self._flushing: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def in_memory(self) -> bool:
        """Nothing was spilled to a tmp/ file yet (the message is small)."""
        return self._fd is None and self._tmp_path is None and self._flushing is None

    def buffered(self) -> bytes:
        """The content held in memory."""
        return b"".join(self._parts)

    async def write(self, data: bytes, newlines: int = -1) -> None:
        """Add LF-form content; ``newlines``: its LF count if the caller knows it."""
        self._parts.append(data)
        self._held += len(data)
        self.size += len(data)
        self.crlf_size += len(data) + (newlines if newlines >= 0 else data.count(b"\n"))
        if self._held >= SPILL_THRESHOLD:
            await self._spill()

    async def _spill(self) -> None:
        """Hand what is held to a thread for tmp/; the next spill (or the
        commit) waits for this one, so writing overlaps receiving."""
        parts, self._parts, self._held = self._parts, [], 0
        await self._flushed()
        loop = asyncio.get_running_loop()
        self._flushing = loop.run_in_executor(self._store._executor, self._write_parts, parts)

    async def _flushed(self) -> None:
        """Wait for the spill in flight; its error (a full disk) is raised
        here, as the DeliveryError every MessageSink call raises."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            try:
                await flushing
            except OSError as exc:
                self._store.note_failure(self.mailboxes, exc)
                raise _delivery_error(exc) from exc

    def _open_blocking(self) -> int:
        if self._fd is None:
            self._store._ensure(self.mailboxes[0])
            name = self._store._namer.unique()
            self._tmp_path = self.mailboxes[0] / "tmp" / name
            self._fd = os.open(
                self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        return self._fd

    def _write_parts(self, parts: list[bytes]) -> None:
        writev_all(self._open_blocking(), parts)

    def finish_blocking(self) -> Path:
        """Write what is held, fsync and close; return the tmp/ path."""
        if self._parts:
            self._write_parts(self._parts)
            self._parts, self._held = [], 0
        fd = self._open_blocking()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            self._fd = None
        assert self._tmp_path is not None
        return self._tmp_path

    def discard_blocking(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_path)
            self._tmp_path = None

    async def commit(self) -> list[Path]:
        """Store durably; raise DeliveryError.  Returns one path per mailbox."""
        if self._closed:
            raise RuntimeError("writer already committed or discarded")
        self._closed = True
        after, facts = self._store.after_delivery, self.facts
        if after is not None and facts is not None:
            if self.prepared is None and self.in_memory:
                try:
                    self.prepared = await after.prepare(self)
                except Exception:  # never refuse a message over it: decided after the store
                    log.exception("deciding before the store failed")
            if self.prepared is not None and self.prepared.moves:
                # Filed elsewhere, discarded or rejected: one fsync'd store,
                # then one atomic rename or unlink.  A journal record would
                # name this file in new/ and bring it back after a crash.
                self.journaled = False
        try:
            await self._flushed()
            paths = await self._store._commit(self)
        except DeliveryError as exc:
            self._store.note_failure(self.mailboxes, exc)
            raise
        except OSError as exc:
            error = _delivery_error(exc)
            self._store.note_failure(self.mailboxes, error)
            raise error from exc
        if after is not None and facts is not None and len(paths) == len(facts.mailboxes):
            # Stored: whatever after_delivery does, the message is not lost.
            paths = await after(facts, paths, self.prepared)
        return paths

    async def discard(self) -> None:
        """Abandon the message (rejected, or the client went away)."""
        self._closed = True
        self._parts, self._held = [], 0
        with contextlib.suppress(Exception):
            await self._flushed()
        if self._fd is not None or self._tmp_path is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._store._executor, self.discard_blocking)


def _delivery_error(exc: OSError) -> DeliveryError:
    paths = tuple(str(p) for p in (exc.filename, exc.filename2) if p)
    fault = errno_fault(exc.errno)
    if fault is StorageFault.NO_SPACE:
        return DeliveryError("mail system full", fault=fault, paths=paths)
    where = f"{paths[-1]}: " if paths else ""
    text = f"local delivery failed: {where}{exc.strerror or exc}"
    return DeliveryError(text, fault=fault, paths=paths)


def _copy_durably(src: Path, dst: Path) -> None:
    tmp = dst.parent.parent / "tmp" / dst.name
    shutil.copyfile(src, tmp)
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, dst)


@dataclass
class RecoveryReport:
    removed_tmp: list[Path] = field(default_factory=list)


def clean_stale_tmp(mail_dir: Path, older_than: float = 36 * 3600) -> RecoveryReport:
    """Remove tmp/ files older than ``older_than`` seconds (Maildir spec: 36 h).

    A file in tmp/ was never acknowledged (the 250 comes after the rename), so
    removing leftovers from a crash loses nothing.  Blocking; run at start.
    """
    report = RecoveryReport()
    cutoff = time.time() - older_than
    if not mail_dir.is_dir():
        return report
    # A tmp/ file with more than one link is a delivery to several mailboxes
    # cut off between linking it into the others' new/ and renaming it into
    # its own (a crash): never acknowledged, so undone everywhere -- every
    # recipient gets the message or none does.  Links in the file's own
    # mailbox are left alone (qmail-style agents link tmp/ to new/ there).
    partial: dict[tuple[int, int], Path] = {}  # (dev, ino) -> the tmp/ file
    for tmp in mail_dir.glob("*/*/tmp"):
        for entry in _entries(tmp):
            with contextlib.suppress(OSError):
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1:
                    partial[(st.st_dev, st.st_ino)] = Path(entry.path)
                elif st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    report.removed_tmp.append(Path(entry.path))
    if partial:
        inodes = {ino for _dev, ino in partial}
        undone: set[Path] = set()
        for new in mail_dir.glob("*/*/new"):
            for entry in _entries(new):
                with contextlib.suppress(OSError):
                    if entry.inode() not in inodes:
                        continue
                    st = entry.stat(follow_symlinks=False)
                    tmp_file = partial.get((st.st_dev, st.st_ino))
                    if tmp_file is not None and tmp_file.parent.parent != new.parent:
                        os.unlink(entry.path)
                        report.removed_tmp.append(Path(entry.path))
                        fsync_dir(new)
                        undone.add(tmp_file)
        for tmp_file in undone:
            with contextlib.suppress(OSError):
                os.unlink(tmp_file)
                report.removed_tmp.append(tmp_file)
    return report


def _entries(directory: Path) -> Iterator[os.DirEntry[str]]:
    """What ``directory`` holds, streamed; nothing, with a log line, if it
    cannot be read: one broken mailbox (owned by another user, a file where a
    directory belongs) must not stop the server from starting."""
    try:
        entries = os.scandir(directory)
    except OSError as exc:
        log.error(
            "mailbox %s: cannot read %s/: %s; deliveries to it fail until that is fixed",
            directory.parent,
            directory.name,
            exc.strerror,
        )
        return
    with entries:
        try:
            yield from entries
        except OSError as exc:
            log.error("mailbox %s: reading %s/ failed: %s", directory.parent, directory.name, exc)
