"""One Maildir as a POP3 maildrop: lock, snapshot, UIDs, sizes, reads, UPDATE.

Everything in ``Pop3Mailbox`` blocks (directory listings, opens, renames,
unlinks): the POP3 session calls it through the executor, never on the
event loop.  ``ReadAhead``, RETR's reader, runs on the event loop and does
its reading in the executor itself.

* **Lock** (RFC 1939 §8: one TRANSACTION session per maildrop):
  ``flock(LOCK_EX | LOCK_NB)`` on ``postoffice-pop3.lock`` in the Maildir.
  flock locks belong to the open file description, so two sessions in one
  process (two ``open`` calls) exclude each other like two processes do, and
  the kernel drops the lock when its holder dies: a crash never locks the
  owner out.  Several nodes ([cluster], docs/cluster.md) add a lock the
  others honour (``MaildropLocks``, taken after the flock, in the same
  blocking call); UPDATE first checks it is still held.
* **Snapshot**: the messages in ``new/`` and ``cur/`` at login, in delivery
  order; mail that arrives later is not part of the session (RFC 1939 §5
  numbers messages for the session's life).
* **UIDs** (RFC 1939 §7 UIDL): the Maildir base name, which the Maildir
  spec makes unique and which survives new/ -> cur/ moves and flag changes;
  a base name that is not 1-70 characters of 0x21-0x7E becomes a SHA-1 hex
  digest of the name, equally stable.
* **Sizes**: RFC 1939 §5 wants exact octets with CRLF endings.  Dovecot-style
  names carry them (``,W=``); for other names the size is computed once from
  the file and cached in ``postoffice-pop3.sizes`` (written atomically),
  so a later login needs no reads.  The computing is the protocol's
  (``protocol.pop3.wire_size``, passed to ``open`` as ``measure``): this
  module reads files and hands their bytes on, so LIST can never disagree
  with what RETR sends, and storage imports no protocol.
* **UPDATE** (RFC 1939 §6) happens only after QUIT: deleted messages are
  unlinked, retrieved ones move to ``cur/`` with the ``S`` (seen) flag, the
  standard Maildir way, so other Maildir readers see them as read.
* **Read-ahead** (``ReadAhead``): clients RETR in order, and handing one
  10 KiB read to a thread costs more than the read; small messages are read
  in windows, ahead of the client, in one executor hop each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from postoffice.storage import quota
from postoffice.storage.maildir import ensure_maildir, name_sizes
from postoffice.storage.maildir_flags import MessageGone as MessageGone
from postoffice.storage.maildir_flags import with_flags
from postoffice.storage.safeio import fsync_dir, write_all

LOCK_NAME = "postoffice-pop3.lock"
SIZES_NAME = "postoffice-pop3.sizes"
READ_CHUNK = 256 * 1024
# Read-ahead windows: at most this many messages, this many octets.  The next
# window is read in the background while the client works through the
# current one, so in-order RETR never waits for a thread.
AHEAD_COUNT = 64
AHEAD_BYTES = 512 * 1024
_UID_CHARS = re.compile(r"[\x21-\x7e]{1,70}")
_TIME_PREFIX = re.compile(r"(\d{1,18})(?:\.M(\d{1,9}))?(?!\d)")

# The octets RETR sends for a message given as chunks of its file, not
# counting dot-stuffing and the terminator (``protocol.pop3.wire_size``).
WireSize = Callable[[Iterable[bytes]], int]
# What RETR sends for a file's content (after the +OK line), given the
# message's listed size; None when the content does not match that size (the
# file changed): injected by the session (protocol/pop3.py knows the wire form).
WireForm = Callable[[bytes, int], bytes | None]


class MailboxBusy(Exception):
    """Another POP3 session holds this maildrop (RFC 2449 §8.1.1 [IN-USE])."""


class HeldLock(Protocol):
    """A maildrop lock other nodes honour (cluster/pop3_lock.py)."""

    def verify(self) -> bool:
        """Still held?  Blocking (asks the lock's keeper)."""
        ...

    def release(self) -> None:
        """Never blocks (the event loop calls it); idempotent."""
        ...


class MaildropLocks(Protocol):
    """Where ``HeldLock``s come from: one per process, shared by its sessions."""

    def acquire(self, account: str) -> HeldLock:
        """Blocking.  MailboxBusy when another node's session holds it;
        OSError when it cannot be asked."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Pop3Message:
    uid: str
    size: int  # octets RETR sends, CRLF line endings, without dot-stuffing
    subdir: str  # "new" or "cur"
    name: str  # current file name
    deleted: bool = False  # DELE'd in this session (undone by RSET)
    retrieved: bool = False  # RETR'd in this session: gets the seen flag at the end
    gone: bool = False  # found removed by someone else (MessageGone): DELE refuses it

    @property
    def stem(self) -> str:
        """The part of the name no flag change or new/ -> cur/ move alters."""
        return self.name.partition(":2,")[0]


@dataclass(frozen=True, slots=True)
class UpdateResult:
    deleted: int
    failed: int  # deletions that did not happen (the -ERR of RFC 1939 §6)
    seen: int


class MailboxLock:
    """An exclusive, non-blocking flock on the maildrop's lock file."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, maildir: Path) -> MailboxLock:
        """Take the lock or raise MailboxBusy."""
        fd = os.open(maildir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MailboxBusy(str(maildir)) from None
            raise
        return cls(fd)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Closing the descriptor drops the lock.  Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class Pop3Mailbox:
    """A locked maildrop with the snapshot taken at login."""

    def __init__(
        self,
        path: Path,
        messages: list[Pop3Message],
        lock: MailboxLock,
        shared: HeldLock | None = None,
    ) -> None:
        self.path = path
        self._root = os.fspath(path)
        self.messages = messages
        self._lock = lock
        self._shared = shared

    @classmethod
    def open(
        cls,
        path: Path,
        measure: WireSize,
        shared: Callable[[], HeldLock] | None = None,
    ) -> Pop3Mailbox:
        """Create the Maildir if needed, lock it (MailboxBusy) and list it;
        ``measure`` sizes a message whose name does not say (see ``scan``);
        ``shared`` takes the other nodes' lock too (after the flock: a
        second session on this node is refused without asking them)."""
        ensure_maildir(path)
        lock = MailboxLock.acquire(path)
        held: HeldLock | None = None
        try:
            held = shared() if shared is not None else None
            return cls(path, scan(path, measure), lock, held)
        except BaseException:
            if held is not None:
                held.release()
            lock.release()
            raise

    @property
    def locked(self) -> bool:
        return self._lock.held

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()
        self._lock.release()

    # --- the session's view --------------------------------------------------
    def get(self, number: int) -> Pop3Message | None:
        """Message ``number`` (1-based), None if out of range or deleted."""
        if 1 <= number <= len(self.messages):
            msg = self.messages[number - 1]
            return None if msg.deleted else msg
        return None

    def live(self) -> Iterator[tuple[int, Pop3Message]]:
        for number, msg in enumerate(self.messages, 1):
            if not msg.deleted:
                yield number, msg

    def stat(self) -> tuple[int, int]:
        count = size = 0
        for msg in self.messages:
            if not msg.deleted:
                count += 1
                size += msg.size
        return count, size

    def reset(self) -> None:
        """RSET (RFC 1939 §5): unmark every deletion."""
        for msg in self.messages:
            msg.deleted = False

    # --- reading -------------------------------------------------------------
    def read_first(self, msg: Pop3Message) -> tuple[bytes, BinaryIO | None]:
        """The first chunk of ``msg`` and, if there is more, the open file.
        One call (one executor hop) reads a whole small message."""
        fh = self._open(msg)
        try:
            data = fh.read(READ_CHUNK)
        except BaseException:
            fh.close()
            raise
        if len(data) < READ_CHUNK:
            fh.close()
            return data, None
        return data, fh

    def read_small(self, msg: Pop3Message) -> bytes | None:
        """The contents of a small message in one read, None if it cannot be
        read now (it is read again, with a proper error, when it is asked
        for).  Callers check the length they got against ``size``: a short
        read is not retried here."""
        # os.open/os.read on a str path: a buffered file object and a pathlib
        # join cost more than the read of a small message.
        try:
            fd = self._open_fd(msg)
        except (OSError, MessageGone):
            return None
        try:
            data = os.read(fd, msg.size + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        # Never more than the CRLF size, which bounds the file size.
        return data if len(data) <= msg.size else None

    @staticmethod
    def read_next(fh: BinaryIO) -> bytes:
        """The next chunk; b"" (and the file closed) at the end."""
        data = fh.read(READ_CHUNK)
        if not data:
            fh.close()
        return data

    def _open(self, msg: Pop3Message) -> BinaryIO:
        try:
            return open(self.path / msg.subdir / msg.name, "rb")
        except FileNotFoundError:
            # Another Maildir reader renamed it (flags, new/ -> cur/): follow it.
            if not self._relocate(msg):
                raise MessageGone(msg.uid) from None
            return open(self.path / msg.subdir / msg.name, "rb")

    def _open_fd(self, msg: Pop3Message) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            return os.open(f"{self._root}/{msg.subdir}/{msg.name}", flags)
        except FileNotFoundError:
            if not self._relocate(msg):
                raise MessageGone(msg.uid) from None
            return os.open(f"{self._root}/{msg.subdir}/{msg.name}", flags)

    def _relocate(self, msg: Pop3Message) -> bool:
        stem = msg.stem
        for sub in ("cur", "new"):
            with contextlib.suppress(FileNotFoundError), os.scandir(self.path / sub) as it:
                for entry in it:
                    if entry.name.partition(":2,")[0] == stem:
                        msg.subdir, msg.name = sub, entry.name
                        return True
        return False

    # --- the end of a session --------------------------------------------------
    def update(self) -> UpdateResult:
        """RFC 1939 §6 UPDATE: remove deleted messages, mark retrieved ones seen."""
        if self._shared is not None and not self._shared.verify():
            # Another node may have the maildrop now: change nothing.
            raise OSError(errno.EAGAIN, "the maildrop's cluster lock was lost")
        deleted = failed = freed = 0
        for msg in self.messages:
            if not msg.deleted:
                continue
            try:
                freed += self._unlink(msg)
                deleted += 1
            except MessageGone:
                msg.gone = True  # someone else removed it: not ours to count
            except OSError:
                failed += 1
        # A deletion that a crash undoes would only bring a message back, but
        # the client was told it is gone: make it durable before +OK.
        if deleted:
            for sub in ("new", "cur"):
                with contextlib.suppress(OSError):
                    fsync_dir(self.path / sub)
            quota.record(self.path, -freed, -deleted)  # after the unlinks (Maildir++)
        return UpdateResult(deleted=deleted, failed=failed, seen=self.mark_seen())

    def _unlink(self, msg: Pop3Message) -> int:
        """Remove ``msg``; the octets it took on disk.  MessageGone if someone
        else removed it first (theirs to record, and not a deletion of ours)."""
        try:
            size = self._file_size(msg)
            os.unlink(self.path / msg.subdir / msg.name)
        except FileNotFoundError:
            if not self._relocate(msg):
                raise MessageGone(msg.uid) from None
            size = self._file_size(msg)
            os.unlink(self.path / msg.subdir / msg.name)
        return size

    def _file_size(self, msg: Pop3Message) -> int:
        named = name_sizes(msg.stem)[1].get("S")
        if named is not None:
            return named  # Maildir files are never rewritten: S= holds
        return os.stat(self.path / msg.subdir / msg.name).st_size

    def mark_seen(self) -> int:
        """Move retrieved messages to cur/ with the S flag (Maildir spec).
        Best effort: a message another reader renamed meanwhile is followed."""
        count = 0
        for msg in self.messages:
            if msg.deleted or not msg.retrieved:
                continue
            msg.retrieved = False
            if msg.subdir == "cur" and msg.name.endswith(":2,S"):
                continue  # seen already (a second session): nothing to rename
            for _attempt in range(2):
                target = with_flags(msg.name, add="S")
                if msg.subdir == "cur" and target == msg.name:
                    break
                try:
                    os.rename(self.path / msg.subdir / msg.name, self.path / "cur" / target)
                except FileNotFoundError:
                    if not self._relocate(msg):
                        break
                    continue
                except OSError:
                    break
                msg.subdir, msg.name = "cur", target
                count += 1
                break
        return count


class ReadAhead:
    """RETR's reader for one maildrop: small messages read ahead of the client.

    ``first`` (the RETR that finds nothing read ahead) reads the first chunk
    of its message and, in the same executor hop, the small live messages
    after it: a window of at most ``AHEAD_COUNT`` messages and
    ``AHEAD_BYTES`` octets.  Once the client is half-way through a window,
    ``refill`` reads the next in the background.  ``take`` hands a message
    out once, in its wire form, without waiting: the session can answer at
    once.  A message that could not be read whole (gone, longer than its
    listed size, or changed) is simply not there, and is read again when it
    is asked for, with a proper error.

    Runs on the event loop; the reads, and the encoding (``wire_form``, the
    session's: storage does not know the protocol), run in ``executor``,
    so the loop only hands bytes over.
    """

    def __init__(self, box: Pop3Mailbox, executor: Executor | None, wire_form: WireForm) -> None:
        self.box = box
        self._executor = executor
        self._wire_form = wire_form
        self._loop: asyncio.AbstractEventLoop | None = None  # from the first ``first``
        self._ahead: dict[int, bytes] = {}  # message number -> its wire form
        self._first: asyncio.Future[Any] | None = None  # ``first``'s hop, while it runs
        self._window: asyncio.Future[list[bytes | None]] | None = None  # read in the background
        self._window_plan: list[int] = []  # ... its message numbers
        self._last = 0  # the highest message number read or being read ahead

    def take(self, number: int) -> bytes | None:
        """Message ``number``'s wire form if it was read ahead and is here now."""
        self._collect()
        data = self._ahead.pop(number, None)
        if data is not None and len(self._ahead) > 2 * AHEAD_COUNT:
            # The client skips messages: forget the ones it passed.
            for stale in [k for k in self._ahead if k < number]:
                del self._ahead[stale]
        return data

    async def wait(self, number: int) -> bytes | None:
        """``take``, after waiting for the background window if it holds ``number``."""
        data = self.take(number)
        if data is None and self._window is not None and number in self._window_plan:
            await self.settle()
            data = self.take(number)
        return data

    async def first(self, number: int, msg: Pop3Message) -> tuple[bytes, BinaryIO | None]:
        """``box.read_first(msg)`` for RETR of message ``number``, and a new
        window of the messages after it, read in the same executor hop."""
        self._collect()
        self._ahead.clear()
        plan = self._plan(number + 1)
        loop = self._loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor, self._read_with_window, msg, [m for _, m in plan]
        )
        self._first = future
        try:
            # Shielded: a session cancelled now leaves the read to finish
            # (``pending``) before the maildrop is unlocked.
            first, fh, contents = await asyncio.shield(future)
        finally:
            if future.done():
                self._first = None
        self._ahead = {n: c for (n, _), c in zip(plan, contents, strict=True) if c is not None}
        self._last = plan[-1][0] if plan else number
        self.refill(number)
        return first, fh

    def refill(self, number: int) -> None:
        """Message ``number`` was just sent: read the next window in the
        background once half the current one is used."""
        if self._window is not None or self._last - number > AHEAD_COUNT // 2:
            return
        plan = self._plan(max(self._last, number) + 1)
        if not plan or self._loop is None:
            return
        future = self._loop.run_in_executor(self._executor, self._read_all, [m for _, m in plan])
        # Retrieved here so a window nobody collects (the session ended) logs nothing.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._window, self._window_plan = future, [n for n, _ in plan]
        self._last = plan[-1][0]

    async def settle(self) -> None:
        """Let the background window finish (before UPDATE changes files, too)."""
        if self._window is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._window)
            self._collect()

    def pending(self) -> list[asyncio.Future[Any]]:
        """Reads still running for this maildrop (it stays locked until they end)."""
        return [f for f in (self._first, self._window) if f is not None and not f.done()]

    def _collect(self) -> None:
        future = self._window
        if future is None or not future.done():
            return
        self._window, plan, self._window_plan = None, self._window_plan, []
        if future.cancelled() or future.exception() is not None:
            return  # those messages are read when asked for, with a proper error
        for number, data in zip(plan, future.result(), strict=True):
            if data is not None:
                self._ahead[number] = data

    def _plan(self, start: int) -> list[tuple[int, Pop3Message]]:
        """The small live messages from ``start`` on that fit one window."""
        box = self.box
        plan: list[tuple[int, Pop3Message]] = []
        budget = AHEAD_BYTES
        for number in range(start, min(start + AHEAD_COUNT, len(box.messages) + 1)):
            msg = box.get(number)
            if msg is None:
                continue
            budget -= msg.size
            if budget < 0:
                break
            plan.append((number, msg))
        return plan

    # --- in the executor ----------------------------------------------------------------
    def _read_all(self, messages: list[Pop3Message]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for msg in messages:
            data = self.box.read_small(msg)
            out.append(None if data is None else self._wire_form(data, msg.size))
        return out

    def _read_with_window(
        self, msg: Pop3Message, window: list[Pop3Message]
    ) -> tuple[bytes, BinaryIO | None, list[bytes | None]]:
        first, fh = self.box.read_first(msg)
        try:
            return first, fh, self._read_all(window)
        except BaseException:
            if fh is not None:
                fh.close()
            raise


def scan(path: Path, measure: WireSize) -> list[Pop3Message]:
    """The messages in ``path`` now, in delivery order, with UIDs and sizes
    (``measure``: the size of a message whose name lacks ``W=``, from its
    file's chunks; the result is cached)."""
    # A login lists every message: this loop is kept free of avoidable calls.
    found: list[tuple[int, int, str, str]] = []
    time_prefix = _TIME_PREFIX.match
    for sub in ("new", "cur"):
        with os.scandir(path / sub) as it:
            for entry in it:
                name = entry.name
                # Names starting with "." are temporary or hidden (Maildir spec).
                if name.startswith(".") or not entry.is_file():
                    continue
                # Maildir names start with the delivery time in seconds, and ours
                # and Dovecot's go on with ".M<microseconds>": sort by both, then
                # by name.
                m = time_prefix(name)
                found.append((int(m[1]), int(m[2] or 0), name, sub) if m else (0, 0, name, sub))
    found.sort()
    cache = SizeCache.load(path)
    root = os.fspath(path)  # str paths: pathlib costs more than the stat per message
    messages: list[Pop3Message] = []
    stems: set[str] = set()
    uids: set[str] = set()
    for _secs, _usecs, name, sub in found:
        stem = name.partition(":2,")[0]
        if stem in stems:
            continue  # moved from new/ to cur/ while we listed: seen twice
        base, sizes = name_sizes(stem)
        try:
            size = sizes.get("W")
            if size is None:
                size = _computed_size(f"{root}/{sub}/{name}", stem, sizes.get("S"), cache, measure)
        except FileNotFoundError:
            continue  # removed while we listed
        stems.add(stem)
        uid = base if base not in uids and _UID_CHARS.fullmatch(base) else _digest_uid(stem)
        uids.add(uid)
        messages.append(Pop3Message(uid, size, sub, name))
    cache.save(path, stems)
    return messages


def _digest_uid(stem: str) -> str:
    # The base is not a legal unique-id (RFC 1939 §7, 1-70 characters of
    # 0x21-0x7E), or a second file claims the same base: a digest of the
    # whole stem is just as stable.
    return hashlib.sha1(stem.encode("utf-8", "surrogateescape")).hexdigest()


def _computed_size(
    file: str, stem: str, named_size: int | None, cache: SizeCache, measure: WireSize
) -> int:
    """The CRLF size of a message whose name lacks ``W=``: cached, or read.

    A name's ``S=`` is the file's size (Maildir files are never rewritten,
    only renamed; ``W=`` is trusted the same way), so with it a cached size
    needs no stat: a login costs no system call per message.
    """
    if named_size is not None:
        cached = cache.get(stem, named_size)
        if cached is not None:
            return cached
    file_size = os.stat(file).st_size
    cached = cache.get(stem, file_size)
    if cached is not None:
        return cached
    with open(file, "rb") as fh:
        size = measure(iter(lambda: fh.read(READ_CHUNK), b""))
    cache.put(stem, file_size, size)
    return size


class SizeCache:
    """CRLF sizes of messages whose names lack ``,W=``: one line per message,
    ``stem TAB file-size TAB crlf-size``; a file-size mismatch invalidates."""

    def __init__(self, entries: dict[str, tuple[int, int]]) -> None:
        self._entries = entries
        self._dirty = False

    @classmethod
    def load(cls, path: Path) -> SizeCache:
        entries: dict[str, tuple[int, int]] = {}
        try:
            text = (path / SIZES_NAME).read_bytes().decode("utf-8", "surrogateescape")
        except OSError:
            return cls(entries)
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                entries[parts[0]] = (int(parts[1]), int(parts[2]))
        return cls(entries)

    def get(self, stem: str, file_size: int) -> int | None:
        entry = self._entries.get(stem)
        return entry[1] if entry and entry[0] == file_size else None

    def put(self, stem: str, file_size: int, crlf_size: int) -> None:
        if "\t" in stem or "\n" in stem or "\r" in stem:
            return  # cannot be written as a line; recomputed next time
        self._entries[stem] = (file_size, crlf_size)
        self._dirty = True

    def save(self, path: Path, live: set[str]) -> None:
        """Write the cache if it changed, dropping messages that are gone."""
        stale = self._entries.keys() - live
        if not (self._dirty or stale):
            return
        for stem in stale:
            del self._entries[stem]
        body = "".join(f"{s}\t{f}\t{c}\n" for s, (f, c) in self._entries.items())
        tmp = path / "tmp" / f"{SIZES_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, body.encode("utf-8", "surrogateescape"))
                os.fsync(fd)  # never a torn cache after a crash: a wrong size is worse
            finally:
                os.close(fd)
            os.replace(tmp, path / SIZES_NAME)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._dirty = False
