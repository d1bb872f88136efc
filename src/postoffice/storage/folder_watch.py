"""Tell IMAP sessions when a Maildir folder's messages change, without polling.

RFC 2177 IDLE promises the client untagged EXISTS/EXPUNGE/FETCH as soon as
the folder changes; the issue asks for new mail within 1 s and no per-session
disk polling.  Every change to a folder's messages is a directory event in
its ``new/`` or ``cur/``, whoever makes it: a delivery renames a file from
``tmp/`` into ``new/`` (this process, the extra smtp processes of
``[limits] smtp_processes``, or another MDA), a flag change or a move to
``cur/`` renames, an expunge or POP3 DELE unlinks.  So one ``FolderWatcher``
per server process holds one Linux inotify descriptor (``inotify_simple``,
read from the event loop with ``add_reader``) and one watch per directory,
shared by every session that has the folder selected: ``watch()`` takes a
reference, ``FolderWatch.close()`` gives it back, and the last one removes
the kernel watch (watches are a bounded resource, ``fs.inotify.
max_user_watches``).  An event sets ``changed`` on each ``FolderWatch`` of
that folder; the session clears it before it looks at the folder, so no
change between the look and the wait is missed.

Where inotify cannot be had (not Linux, or ``inotify_init1`` refused), or
the kernel refuses a folder's watch (the per-user limit), that folder falls
back to the old check: two stats of ``new/`` and ``cur/`` once a second --
one poller per folder, shared by its sessions, not one per session -- and
the log says so once (per process, or per folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

log = logging.getLogger("postoffice.storage")

POLL_SECONDS = 1.0  # the fallback's period: the bound on IDLE latency
SUBDIRS = ("new", "cur")

# inotify(7) event bits; the same numbers as inotify_simple.flags.
IN_CLOSE_WRITE = 0x00000008  # a file written in place (an MDA writing straight into new/)
IN_MOVED_FROM = 0x00000040  # a flag rename, new/ -> cur/, a MOVE out
IN_MOVED_TO = 0x00000080  # a Maildir delivery (tmp/ -> new/), a flag rename
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200  # EXPUNGE, POP3 DELE
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000  # events were lost: wake everyone
IN_IGNORED = 0x00008000  # the kernel dropped the watch (directory gone)
IN_ONLYDIR = 0x01000000
WATCH_MASK = (
    IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)


def change_stamp(folder: Path) -> tuple[int, int] | None:
    """The mtimes of ``new/`` and ``cur/`` (ns): any delivery, rename or
    unlink there changes one.  None when the folder is gone."""
    try:
        return (
            os.stat(folder / "new").st_mtime_ns,
            os.stat(folder / "cur").st_mtime_ns,
        )
    except OSError:
        return None


class FolderWatch:
    """One session's hold on one folder: ``changed`` is set on every change."""

    def __init__(self, watcher: FolderWatcher, folder: Path) -> None:
        self.folder = folder
        self.changed = asyncio.Event()
        self.polling = False  # True: the 1 s fallback serves this folder
        self._watcher: FolderWatcher | None = watcher
        self._wds: tuple[int, ...] = ()

    def close(self) -> None:
        """Give the reference back (twice is harmless)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher._release(self)


class _Poller:
    def __init__(self) -> None:
        self.watches: set[FolderWatch] = set()
        self.task: asyncio.Task[None] | None = None


class FolderWatcher:
    """The process's watches; see the module docstring.

    ``executor`` runs the fallback's stats; ``use_inotify=False`` forces the
    fallback (tests of it)."""

    def __init__(self, executor: Executor | None = None, *, use_inotify: bool = True) -> None:
        self._executor = executor
        self._use_inotify = use_inotify
        self._inotify: Any = None  # inotify_simple.INotify (untyped) once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._by_wd: dict[int, set[FolderWatch]] = {}
        self._pollers: dict[Path, _Poller] = {}
        self._refused: set[Path] = set()  # folders whose refusal was logged

    # --- what sessions call --------------------------------------------------------
    def watch(self, folder: Path) -> FolderWatch:
        """A reference on ``folder`` (its ``new/`` and ``cur/``), until ``close()``.

        One inotify_add_watch per directory: a path lookup of a folder just
        selected, cheap enough for the event loop."""
        handle = FolderWatch(self, folder)
        inotify = self._start()
        if inotify is not None:
            wds: list[int] = []
            try:
                for sub in SUBDIRS:
                    wds.append(inotify.add_watch(str(folder / sub), WATCH_MASK))
            except OSError as exc:
                self._drop_unused(wds)
                self._log_refusal(folder, exc)
            else:
                handle._wds = tuple(wds)
                for wd in wds:
                    self._by_wd.setdefault(wd, set()).add(handle)
                return handle
        handle.polling = True
        poller = self._pollers.setdefault(folder, _Poller())
        poller.watches.add(handle)
        if poller.task is None:
            poller.task = asyncio.get_running_loop().create_task(self._poll(folder, poller))
        return handle

    def watched_directories(self) -> int:
        """How many kernel watches are held (each ``new/`` and ``cur/`` once)."""
        return len(self._by_wd)

    def polled_folders(self) -> int:
        return len(self._pollers)

    def close(self) -> None:
        """At server stop: the descriptor and the pollers go."""
        for poller in self._pollers.values():
            if poller.task is not None:
                poller.task.cancel()
        self._pollers.clear()
        self._by_wd.clear()
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
        self._use_inotify = False

    # --- inotify -------------------------------------------------------------------
    def _start(self) -> Any:
        """The inotify descriptor, opened on first use; None: not available."""
        if self._inotify is not None or not self._use_inotify:
            return self._inotify
        self._use_inotify = False  # tried once, whatever happens
        try:
            from inotify_simple import INotify

            inotify = INotify(nonblocking=True)
        except (ImportError, OSError, AttributeError) as exc:
            # AttributeError: a libc without inotify_init1 (not Linux).
            log.warning(
                "inotify unavailable (%s): IDLE checks each selected folder once a second", exc
            )
            return None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(inotify.fileno(), self._on_events)
        self._inotify = inotify
        return inotify

    def _on_events(self) -> None:
        inotify = self._inotify
        if inotify is None:
            return
        try:
            events = inotify.read(timeout=0)
        except OSError as exc:  # EAGAIN between FIONREAD and read; nothing lost
            log.debug("inotify read: %s", exc)
            return
        woken: set[FolderWatch] = set()
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                for handles in self._by_wd.values():
                    woken |= handles
                continue
            held = self._by_wd.get(event.wd)
            if held is None:
                continue  # a watch we removed; its last events still arrive
            woken |= held
            if event.mask & IN_IGNORED:
                del self._by_wd[event.wd]  # the directory is gone, and the watch with it
        for handle in woken:
            handle.changed.set()

    def _drop_unused(self, wds: list[int]) -> None:
        for wd in wds:
            if not self._by_wd.get(wd) and self._inotify is not None:
                self._by_wd.pop(wd, None)
                # OSError: already gone with its directory (IN_IGNORED).
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(wd)

    def _log_refusal(self, folder: Path, exc: OSError) -> None:
        if folder in self._refused:
            return
        self._refused.add(folder)
        if exc.errno == errno.ENOSPC:  # inotify_add_watch(2): the per-user watch limit
            log.warning(
                "inotify watch refused for %s (fs.inotify.max_user_watches reached):"
                " IDLE checks it once a second",
                folder,
            )
        else:
            log.info("inotify watch refused for %s (%s): IDLE checks it once a second", folder, exc)

    # --- the fallback ----------------------------------------------------------------
    async def _poll(self, folder: Path, poller: _Poller) -> None:
        loop = asyncio.get_running_loop()
        stamp = await loop.run_in_executor(self._executor, change_stamp, folder)
        while poller.watches:
            await asyncio.sleep(POLL_SECONDS)
            now = await loop.run_in_executor(self._executor, change_stamp, folder)
            if now != stamp:
                stamp = now
                for handle in poller.watches:
                    handle.changed.set()

    # --- references ------------------------------------------------------------------
    def _release(self, handle: FolderWatch) -> None:
        if handle.polling:
            poller = self._pollers.get(handle.folder)
            if poller is not None:
                poller.watches.discard(handle)
                if not poller.watches:
                    del self._pollers[handle.folder]
                    if poller.task is not None:
                        poller.task.cancel()
            return
        for wd in handle._wds:
            handles = self._by_wd.get(wd)
            if handles is not None:
                handles.discard(handle)
        self._drop_unused(list(handle._wds))
