"""A new message on its way into the queue: streamed to ``tmp/``, then
renamed in through the directory lane (lane.py) and acknowledged only after
the directory fsync that covers it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path

from postoffice.delivery.content import TraitScanner
from postoffice.delivery.queue.lane import DirectoryLane
from postoffice.delivery.queue.records import QueueEntry, QueueError, StoredEnvelope
from postoffice.mail.folding import LineFolder
from postoffice.storage.errors import errno_fault
from postoffice.storage.safeio import write_all

SPILL_THRESHOLD = 64 * 1024  # bytes kept in memory before the message streams to disk

# Called with the new entry once a message is durable (the queue schedules it).
OnCommit = Callable[[QueueEntry], Awaitable[None] | None]


def tmp_suffix() -> str:
    """Tells apart two files being written for one queue id (O_EXCL guards
    them); not secret, so ``random`` rather than a getrandom(2) call."""
    return f"{random.getrandbits(32):08x}"


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
        envelope: StoredEnvelope,
        *,
        tmp_dir: Path,
        path: Path,
        lane: DirectoryLane,
        executor: Executor,
        on_commit: OnCommit | None = None,
    ) -> None:
        self.envelope = envelope
        self.on_commit = on_commit
        self._tmp_dir = tmp_dir
        self._path = path  # where the committed message goes: <id>.msg
        self._lane = lane
        self._executor = executor
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
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._executor, self._write_blocking, chunk)
            except OSError as exc:
                raise _queue_error(exc) from exc

    def _write_blocking(self, chunk: bytes) -> None:
        if self._fd is None:
            self._tmp_path = self._tmp_dir / f"{self.queue_id}.{tmp_suffix()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                self._fd = os.open(self._tmp_path, flags, 0o600)
            except FileNotFoundError:  # tmp/ removed under us: make it again
                os.makedirs(self._tmp_dir, mode=0o700, exist_ok=True)
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
            os.replace(self._tmp_path, self._path)
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
            await self._lane.run(functools.partial(self.finish_blocking, chunk, head))
        except OSError as exc:
            raise _queue_error(exc) from exc
        entry = QueueEntry.new(self.envelope, len(self._header), self._scanner.traits())
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
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._discard_blocking)


def _queue_error(exc: OSError) -> QueueError:
    """The DeliveryError (storage/errors.py) a MessageSink raises for ``exc``."""
    return QueueError(f"cannot queue message: {exc.strerror or exc}", fault=errno_fault(exc.errno))
