"""storage/folder_watch.py: one kernel watch per directory, shared and counted.

Real inotify on real directories (the test machines are Linux); the
fallback is forced with ``use_inotify=False``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from postoffice.storage.folder_watch import FolderWatcher


def make_folder(root: Path, name: str) -> Path:
    folder = root / name
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True)
    return folder


def deliver(folder: Path, name: str) -> None:
    """As an MDA does: write in tmp/, rename into new/."""
    (folder / "tmp" / name).write_bytes(b"Subject: x\n\nhi\n")
    os.rename(folder / "tmp" / name, folder / "new" / name)


async def woken(watch_changed: asyncio.Event, within: float = 1.0) -> bool:
    try:
        await asyncio.wait_for(watch_changed.wait(), within)
    except TimeoutError:
        return False
    return True


def test_watches_are_counted_per_directory(tmp_path: Path) -> None:
    inbox, sent = make_folder(tmp_path, "inbox"), make_folder(tmp_path, ".Sent")

    async def scenario() -> None:
        watcher = FolderWatcher()
        a = watcher.watch(inbox)
        b = watcher.watch(inbox)
        assert not a.polling and not b.polling
        assert watcher.watched_directories() == 2  # new/ and cur/, once for both
        c = watcher.watch(sent)
        assert watcher.watched_directories() == 4
        a.close()
        a.close()  # twice: still one reference given back
        assert watcher.watched_directories() == 4  # b still holds the inbox
        deliver(inbox, "1")
        assert await woken(b.changed)
        assert not a.changed.is_set()  # closed: no longer told
        assert not c.changed.is_set()  # another folder
        b.close()
        assert watcher.watched_directories() == 2
        c.close()
        assert watcher.watched_directories() == 0
        d = watcher.watch(inbox)  # selected again: watched again
        assert watcher.watched_directories() == 2
        os.rename(inbox / "new" / "1", inbox / "cur" / "1:2,S")
        assert await woken(d.changed)
        d.close()
        watcher.close()

    asyncio.run(scenario())


def test_every_kind_of_change_wakes(tmp_path: Path) -> None:
    inbox = make_folder(tmp_path, "inbox")

    async def scenario() -> None:
        watcher = FolderWatcher()
        w = watcher.watch(inbox)
        changes = [
            lambda: deliver(inbox, "1"),  # delivery
            lambda: os.rename(inbox / "new" / "1", inbox / "cur" / "1:2,"),  # seen by a client
            lambda: os.rename(inbox / "cur" / "1:2,", inbox / "cur" / "1:2,S"),  # a flag
            lambda: (inbox / "cur" / "1:2,S").unlink(),  # expunge, POP3 DELE
            lambda: (inbox / "new" / "2").write_bytes(b"x"),  # an MDA writing in place
        ]
        for change in changes:
            w.changed.clear()
            change()
            assert await woken(w.changed)
        w.close()
        watcher.close()

    asyncio.run(scenario())


def test_fallback_polls_once_per_folder(tmp_path: Path) -> None:
    inbox = make_folder(tmp_path, "inbox")

    async def scenario() -> None:
        watcher = FolderWatcher(use_inotify=False)
        a, b = watcher.watch(inbox), watcher.watch(inbox)
        assert a.polling and b.polling
        assert watcher.polled_folders() == 1 and watcher.watched_directories() == 0
        await asyncio.sleep(0.1)  # the poller's first look
        deliver(inbox, "1")
        assert await woken(a.changed, 2.5) and await woken(b.changed, 0.1)
        a.close()
        assert watcher.polled_folders() == 1
        b.close()
        assert watcher.polled_folders() == 0
        watcher.close()

    asyncio.run(scenario())


def test_a_refused_watch_falls_back_for_that_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = make_folder(tmp_path, "inbox")
    missing = tmp_path / "gone"  # inotify_add_watch fails (ENOENT) as it would at the limit

    async def scenario() -> None:
        watcher = FolderWatcher()
        with caplog.at_level(logging.INFO, logger="postoffice.storage"):
            refused = watcher.watch(missing)
            again = watcher.watch(missing)
        ok = watcher.watch(inbox)
        assert refused.polling and again.polling and not ok.polling
        assert watcher.watched_directories() == 2 and watcher.polled_folders() == 1
        assert sum("inotify watch refused" in r.message for r in caplog.records) == 1
        for w in (refused, again, ok):
            w.close()
        assert watcher.watched_directories() == 0 and watcher.polled_folders() == 0
        watcher.close()

    asyncio.run(scenario())
