"""Group commit for changes to the queue directory.

Why: a change to the queue (a new message renamed in, a finished one
unlinked, a state file replaced) is durable only after the directory is
fsync'd.  Many sessions commit at once; each paying its own directory fsync
and its own two trips to a worker thread would cost a disk flush per
message and keep the event loop and the threads handing the GIL back and
forth.  So changes are grouped: ``DirectoryLane`` runs every change that
arrived while the previous group was being stored in one thread trip,
followed by one directory fsync; ``DirSync`` shares one directory fsync
among callers that need only that.  A caller's result comes only after the
fsync that covers it, so a change is as durable as with an fsync of its
own (a new message is acknowledged only then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from postoffice.delivery.queue.records import QueueError
from postoffice.storage.safeio import fsync_dir

_T = TypeVar("_T")


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
