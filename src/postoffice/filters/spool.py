"""The spool file a message is written to while filters judge it.

Why: filters may change headers, body and envelope, so with filters
configured a message cannot stream straight into Maildirs and the queue as
it does without them.  It goes to one file under data_dir/spool during DATA
(written in an executor, in large blocks, never kept whole in memory); after
the verdicts it is streamed from there into the real writers
(net/smtp_filtering.py), and removed.  Its durability does not matter: the
250 waits for the Maildir/queue commit, not for this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from concurrent.futures import Executor
from pathlib import Path

from postoffice.storage.safeio import writev_all

SPOOL_DIR = "spool"
FLUSH_AT = 256 * 1024  # octets held before a write (large writes, few thread trips)


def clean_spool_blocking(directory: Path) -> int:
    """Remove spool files a crash left behind (their messages were never
    answered 250); made when missing.  Returns how many were removed."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    removed = 0
    for entry in os.scandir(directory):
        if entry.name.endswith(".msg"):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed


class SpoolWriter:
    """One message being spooled: a ``MessageSink``-shaped writer whose
    ``close`` returns the file (the caller removes it with ``discard``)."""

    def __init__(self, directory: Path, executor: Executor | None) -> None:
        self.path = directory / f"{secrets.token_hex(12)}.msg"
        self._executor = executor
        self._parts: list[bytes] = []
        self._held = 0
        self._fd: int | None = None
        self.size = 0

    async def write(self, data: bytes, newlines: int = -1) -> None:
        self._parts.append(data)
        self._held += len(data)
        self.size += len(data)
        if self._held >= FLUSH_AT:
            await self._flush()

    async def _flush(self) -> None:
        parts, self._parts, self._held = self._parts, [], 0
        loop = asyncio.get_running_loop()
        # An OSError (a full disk) goes to the session as storage failing.
        await loop.run_in_executor(self._executor, self._write_blocking, parts)

    def _write_blocking(self, parts: list[bytes]) -> None:
        if self._fd is None:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        writev_all(self._fd, parts)

    async def close(self) -> Path:
        """Write what is held and close the file; returns its path."""
        await self._flush()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        return self.path

    async def discard(self) -> None:
        self._parts, self._held = [], 0
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._discard_blocking)

    def _discard_blocking(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
