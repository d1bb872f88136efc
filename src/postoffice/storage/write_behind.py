"""Small messages through the journal: durable after one flush, Maildir behind.

Two lanes, each running one batch at a time in the store's threads:

* **commit** -- every message that reached its end of data while the
  previous batch ran: one record each appended to the journal and flushed
  together (``Journal.append``: one ``fdatasync``).  Then each message's
  Maildir file is written to ``tmp/`` and linked/renamed into ``new/``
  *without* fsync, so it is visible the moment the client gets its 250, and
  the commit returns.  Acknowledged = in the journal, durably.
* **retire** -- the committed messages, every 50 ms: one ``syncfs`` of their
  file system makes all their files and renames durable (where the kernel
  reports writeback errors to it, Linux 5.8+; elsewhere each file and
  directory is fsync'd); then the checkpoint says they need the journal no
  more.
  A segment of the journal is reused only after that.  When retiring lags
  so far that no segment is free, commits wait (backpressure), never drop.

After a crash (``recover``, before the server listens): every record past
the checkpoint is written again, durably, over whatever a power cut left of
its file: into ``new/`` under its recorded name, or over the same message in
``cur/`` if a POP3 client had moved it there.  What it cannot tell apart: a
message fetched and deleted in the few milliseconds between its 250 and its
retirement comes back once (never lost, at worst delivered twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from postoffice.storage import quota
from postoffice.storage.held import HELD_DIR, hold, read_held, release
from postoffice.storage.journal import Journal, Record, encode
from postoffice.storage.safeio import (
    SYNCFS_RELIABLE,
    fsync_dir,
    link_or_copy,
    syncfs,
    write_all,
)

log = logging.getLogger("postoffice.journal")

RETRY_DELAY = 1.0  # seconds before a failed retirement is tried again
RETIRE_THREADS = 8
# Retiring waits this long for more messages to share its flushes (each
# retirement costs a few disk flushes however many messages it covers), unless
# this many are waiting or the journal is full.
RETIRE_DELAY = 0.05
RETIRE_BATCH = 512


class SmallMessage(Protocol):
    """A message held in memory on its way into Maildirs: what the commit
    lane needs of it.  ``maildir.DeliveryWriter`` is one; the protocol keeps
    this module from importing the store that uses it."""

    @property
    def mailboxes(self) -> tuple[Path, ...]: ...
    @property
    def size(self) -> int: ...  # S=: octets as stored (LF line endings)
    @property
    def crlf_size(self) -> int: ...  # W=: octets with CRLF line endings

    def buffered(self) -> bytes: ...


@dataclass
class _Waiting:
    writer: SmallMessage
    future: asyncio.Future[list[Path]]


@dataclass
class _Committed:
    seq: int
    targets: tuple[str, ...]
    data: bytes  # kept until retired: rewritten from here if a flush fails
    delivered: bool  # False: the Maildir write failed, the client was told so


# Per message: its files, the error to report, or None (no room in the journal
# yet); and what the retire lane has to make durable.
_BatchResult = tuple[list[list[Path] | Exception | None], list[_Committed]]


class WriteBehind:
    """The commit and retire lanes over one ``Journal``."""

    def __init__(
        self,
        mail_dir: Path,
        journal: Journal,
        pool: Executor,
        unique_name: Callable[[], str],
        ensure: Callable[[Path], None],
        error: Callable[[OSError], Exception],
    ) -> None:
        self.mail_dir = mail_dir
        self.journal = journal
        self._pool = pool
        self._fsync_pool = ThreadPoolExecutor(
            RETIRE_THREADS, thread_name_prefix="postoffice-retire"
        )
        self._unique = unique_name
        self._ensure = ensure
        self._error = error
        self._waiting: list[_Waiting] = []
        self._committing = False
        self._full = False  # the journal had no room: commits wait for the retire lane
        self._committed: list[_Committed] = []
        self._retiring = False
        self._retire_timer: asyncio.TimerHandle | None = None
        self._sync_fds: dict[int, int] = {}  # st_dev -> a directory on it, for syncfs
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, from the first commit
        self._urgent = False  # retire without waiting (draining for a stop)
        if SYNCFS_RELIABLE:
            self._watch_file_system(mail_dir)

    # --- start-up -------------------------------------------------------------------------
    def recover(self) -> int:
        """Blocking, before serving: restore every message the journal holds
        past its checkpoint, and every one held from an earlier start
        (storage/held.py), durably; then start the journal afresh.

        Record by record and target by target: a mailbox that cannot take
        its copy costs only that copy, which is held (durably, before the
        journal is reset) for the next start; everyone else's mail is
        restored now and the journal is used as usual.  Returns how many
        messages were restored (into at least one mailbox)."""
        records = self.journal.open()
        held_dir = self.journal.directory / HELD_DIR
        held = read_held(held_dir)
        cur_index: dict[Path, dict[str, str]] = {}
        written: dict[Path, list[tuple[Record, str]]] = {}  # directory to fsync -> copies
        missing: dict[int, tuple[Record, dict[str, None]]] = {}  # seq -> record, its targets
        failures: dict[Path, tuple[int, str]] = {}  # mailbox -> copies, the last reason

        def failed(record: Record, target: str, exc: OSError) -> None:
            missing.setdefault(record.seq, (record, {}))[1][target] = None
            mailbox = self.mail_dir / Path(target).parent.parent
            count, _reason = failures.get(mailbox, (0, ""))
            failures[mailbox] = (count + 1, exc.strerror or str(exc))

        for record in [r for _path, r in held] + records:
            for target in record.targets:
                try:
                    where = self._restore(self.mail_dir / target, record.data, cur_index)
                except OSError as exc:
                    failed(record, target, exc)
                else:
                    written.setdefault(where, []).append((record, target))
        restored: set[int] = set()
        for directory, copies in written.items():
            try:
                fsync_dir(directory)
            except OSError as exc:  # not durable there: held like any other failure
                for record, target in copies:
                    failed(record, target, exc)
            else:
                restored.update(record.seq for record, _target in copies)
        # Held durably before the reset below lets the journal overwrite them.
        for record, targets in missing.values():
            hold(held_dir, record, list(targets))
        for _path, record in held:
            if record.seq not in missing:
                release(held_dir, record.seq)
        self.journal.reset()
        if restored:
            log.warning("journal: restored %d acknowledged messages after a crash", len(restored))
        for mailbox, (count, reason) in failures.items():
            log.error(
                "journal: mailbox %s: %d acknowledged messages cannot be restored now (%s);"
                " held in %s, restored at the next start once the mailbox is fixed",
                mailbox,
                count,
                reason,
                held_dir,
            )
        return len(restored)

    def close(self) -> None:
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        self._fsync_pool.shutdown(wait=True)
        for fd in self._sync_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._sync_fds = {}
        self.journal.close()

    # --- the commit lane (event loop side) ------------------------------------------------
    def fits(self, writer: SmallMessage) -> bool:
        return self.journal.fits(writer.size + 1024)

    async def commit(self, writer: SmallMessage) -> list[Path]:
        if self._loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() syscall in 3.11.
            self._loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Path]] = self._loop.create_future()
        self._waiting.append(_Waiting(writer, future))
        self._kick_commit()
        return await future

    def _kick_commit(self) -> None:
        if self._committing or self._full or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._committing = True
        assert self._loop is not None
        work = self._loop.run_in_executor(self._pool, self._commit_batch, batch)
        work.add_done_callback(partial(self._commit_done, batch))

    def _commit_done(self, batch: list[_Waiting], work: asyncio.Future[_BatchResult]) -> None:
        self._committing = False
        exc = work.exception()
        if exc is not None:
            error = self._error(exc) if isinstance(exc, OSError) else exc
            log.error("journal: commit failed: %s", exc)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
        else:
            results, committed = work.result()
            unwritten = [item for item, r in zip(batch, results, strict=True) if r is None]
            for item, result in zip(batch, results, strict=True):
                if result is None or item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
            if unwritten:  # no room: first in line again once the retire lane frees some
                self._waiting[:0] = unwritten
                self._full = True
            self._committed.extend(committed)
            self._kick_retire()  # at once when full, else after RETIRE_DELAY
        self._kick_commit()

    # --- the commit lane (thread side) ------------------------------------------------------
    def _commit_batch(self, batch: list[_Waiting]) -> _BatchResult:
        seq = self.journal.next_seq
        plans: list[tuple[int, tuple[str, ...], bytes]] = []
        records = []
        for i, item in enumerate(batch):
            writer = item.writer
            data = writer.buffered()
            suffix = f",S={writer.size},W={writer.crlf_size}"
            targets = tuple(
                f"{mailbox.parent.name}/{mailbox.name}/new/{self._unique()}{suffix}"
                for mailbox in writer.mailboxes
            )
            plans.append((seq + i, targets, data))
            records.append(encode(seq + i, targets, data))
        written = self.journal.append(records)  # the durable point: one fdatasync
        results: list[list[Path] | Exception | None] = []
        committed: list[_Committed] = []
        for i, (number, targets, data) in enumerate(plans):
            if i >= written:
                results.append(None)
                continue
            try:
                results.append(self._write_files(targets, data))
                committed.append(_Committed(number, targets, data, True))
            except OSError as exc:
                # Durable in the journal but not in the Maildir: the client is
                # told to try again, so the record is retired without files.
                log.error("journal: Maildir write failed after the journal commit: %s", exc)
                results.append(self._error(exc))
                committed.append(_Committed(number, targets, data, False))
        return results, committed

    def _write_files(self, targets: Sequence[str], data: bytes) -> list[Path]:
        """tmp/ then new/ (links for further mailboxes), no fsync: the journal
        holds the message until the retire lane has flushed these."""
        paths = [self.mail_dir / t for t in targets]
        for path in paths:
            self._ensure(path.parent.parent)
        first = paths[0]
        tmp = first.parent.parent / "tmp" / first.name.split(",", 1)[0]
        _write_new(tmp, data)
        done: list[Path] = []
        try:
            for path in paths[1:]:
                link_or_copy(tmp, path, partial(_write_through_tmp, data=data))
                done.append(path)
            os.rename(tmp, first)
        except BaseException:
            for path in done:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        for path in paths:  # the mailboxes' maildirsize (storage/quota.py), after the renames
            quota.record(path.parent.parent, len(data), 1)
        return paths

    # --- the retire lane ----------------------------------------------------------------
    def _kick_retire(self) -> None:
        if self._retiring or not self._committed:
            return
        if not (self._full or self._urgent or len(self._committed) >= RETIRE_BATCH):
            if self._retire_timer is None:
                assert self._loop is not None
                self._retire_timer = self._loop.call_later(RETIRE_DELAY, self._retire_due)
            return
        self._start_retire()

    def _retire_due(self) -> None:
        self._retire_timer = None
        if not self._retiring and self._committed:
            self._start_retire()

    def _start_retire(self) -> None:
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        batch, self._committed = self._committed, []
        self._retiring = True
        assert self._loop is not None
        work = self._loop.run_in_executor(self._pool, self._retire_batch, batch)
        work.add_done_callback(partial(self._retire_done, batch))

    def _retire_done(self, batch: list[_Committed], work: asyncio.Future[None]) -> None:
        self._retiring = False
        exc = work.exception()
        if exc is not None:
            log.error("journal: cannot make %d messages durable yet: %s", len(batch), exc)
            self._committed[:0] = batch
            if self._retire_timer is None:
                assert self._loop is not None
                self._retire_timer = self._loop.call_later(RETRY_DELAY, self._retire_due)
            return
        if self._full:
            self._full = False
            self._kick_commit()
        self._kick_retire()

    def _retire_batch(self, batch: list[_Committed]) -> None:
        """Flush the batch's files and directories, then move the checkpoint past it."""
        live = [c for c in batch if c.delivered]
        paths = [self.mail_dir / t for c in live for t in c.targets]
        if not self._make_durable(paths):
            # A flush failed (the kernel may have dropped those pages) or a file
            # is not where we left it: write the whole batch again from memory.
            cur_index: dict[Path, dict[str, str]] = {}
            dirs = {
                self._restore(self.mail_dir / t, c.data, cur_index, moved_only=True)
                for c in live
                for t in c.targets
            }
            for d in dirs:
                fsync_dir(d)
        self.journal.write_checkpoint(max(c.seq for c in batch) + 1)

    def _watch_file_system(self, directory: Path) -> None:
        """Keep a descriptor on ``directory``'s file system: syncfs through it
        reports every writeback error since it was opened, so it must be open
        before any file it is to vouch for is written (done at start for the
        mail directory)."""
        with contextlib.suppress(OSError):
            device = os.stat(directory).st_dev
            if device not in self._sync_fds:
                self._sync_fds[device] = os.open(
                    directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )

    def _make_durable(self, paths: list[Path]) -> bool:
        if not SYNCFS_RELIABLE:
            return self._fsync_each(paths)
        try:
            by_device: dict[int, list[Path]] = {}
            for path in paths:
                by_device.setdefault(os.stat(path.parent).st_dev, []).append(path)
        except OSError as exc:
            log.error("journal: cannot stat a Maildir: %s", exc)
            return False
        ok = True
        for device, on_device in by_device.items():
            if device in self._sync_fds:
                ok = self._syncfs(self._sync_fds[device]) and ok
            else:
                # A file system first seen now: a descriptor opened after these
                # files were written would not report their writeback errors.
                ok = self._fsync_each(on_device) and ok
                self._watch_file_system(on_device[0].parent)
        return ok

    @staticmethod
    def _syncfs(fd: int) -> bool:
        """One syncfs per file system the batch touched: every file, rename and
        directory on it durable at once -- a per-file fsync costs a journal
        commit each and took a third of a message's CPU time.  The descriptor
        stays open, so a writeback error since start-up is reported here."""
        try:
            syncfs(fd)
        except OSError as exc:
            log.error("journal: syncfs failed: %s", exc)
            return False
        return True

    def _fsync_each(self, paths: list[Path]) -> bool:
        """Without a reliable syncfs: every file (in parallel threads, so the file
        system merges their commits), then each directory."""
        flushed = list(self._fsync_pool.map(_fsync_file, paths))
        ok = None not in flushed
        for d in {p for p in flushed if p is not None}:
            try:
                fsync_dir(d)
            except OSError:
                ok = False
        return ok

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until both lanes are idle: a clean stop leaves nothing to replay."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._urgent = True
        try:
            while (self._committing or self._retiring or self._waiting or self._committed) and (
                loop.time() < deadline
            ):
                self._kick_retire()
                await asyncio.sleep(0.01)
        finally:
            self._urgent = False

    # --- restoring a message durably ----------------------------------------------------------
    def _restore(
        self,
        path: Path,
        data: bytes,
        cur_index: dict[Path, dict[str, str]],
        moved_only: bool = False,
    ) -> Path:
        """Write ``data`` durably as ``path`` (new/<name>) or, if a POP3 client
        moved that message to cur/ (flags after ":2,"), over that file.
        ``moved_only``: a message that is in neither place was deleted by its
        reader while we ran, and stays deleted.  Returns the directory to fsync."""
        mailbox = path.parent.parent
        self._ensure(mailbox)
        target = path
        if not path.exists():
            index = cur_index.get(mailbox)
            if index is None:
                index = cur_index[mailbox] = _cur_stems(mailbox / "cur")
            name = index.get(path.name)
            if name is not None:
                target = mailbox / "cur" / name
            elif moved_only:
                return path.parent
        tmp = mailbox / "tmp" / f"restore.{secrets.token_hex(8)}.{path.name.split(',', 1)[0]}"
        _write_new(tmp, data, sync=True)
        os.rename(tmp, target)
        return target.parent


def _write_new(path: Path, data: bytes, sync: bool = False) -> None:
    """Create ``path`` with ``data``; on failure (a full disk) leave nothing behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _write_through_tmp(path: Path, data: bytes) -> None:
    """A copy of the message at ``path`` (new/), written in that Maildir's tmp/
    first, for a mailbox the file cannot be hard-linked into."""
    tmp = path.parent.parent / "tmp" / path.name.split(",", 1)[0]
    _write_new(tmp, data)
    os.rename(tmp, path)


def _fsync_file(path: Path) -> Path | None:
    """fsync ``path``; its directory, or None if it failed or is gone (moved)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.fsync(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return path.parent


def _cur_stems(cur: Path) -> dict[str, str]:
    """cur/ file names by the name they had in new/ (before ":2,flags")."""
    try:
        with os.scandir(cur) as it:
            return {entry.name.partition(":2,")[0]: entry.name for entry in it}
    except FileNotFoundError:
        return {}
