"""Mailboxes of removed users: moved aside, never handed to the next owner.

``postoffice user remove`` moves the Maildir to
``data_dir/removed/<domain>/<localpart>-<UTC time>`` (outside ``mail/``, so
neither the server, POP3 nor a Maildir reader pointed at ``mail/`` sees it,
and a user added later under the same name starts empty), or deletes it with
``--delete-mail``.  ``user add`` refuses to give a new user a Maildir that
still holds messages (``messages_in``), unless told to.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path

REMOVED_DIR = "removed"


def messages_in(maildir: Path) -> int:
    """How many messages ``maildir`` holds in new/ and cur/ (0 if it is not there)."""
    count = 0
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as entries:
                count += sum(1 for e in entries if not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return count


def move_aside(data_dir: Path, maildir: Path, now: datetime.datetime | None = None) -> Path:
    """Move ``maildir`` (``mail/<domain>/<local>``) under ``removed/``; the new path."""
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    parent = data_dir / REMOVED_DIR / maildir.parent.name
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = parent / f"{maildir.name}-{when}"
    n = 1
    while target.exists():  # removed twice in one second
        n += 1
        target = parent / f"{maildir.name}-{when}-{n}"
    os.rename(maildir, target)
    return target


def delete(maildir: Path) -> None:
    shutil.rmtree(maildir)
