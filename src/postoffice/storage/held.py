"""Acknowledged messages a restart could not restore yet, kept for the next one.

Why: after a crash the journal's records are written back into their
Maildirs before the server listens (storage/write_behind.py).  One mailbox
that cannot take its copy -- a ``tmp/`` made by root, a file where ``tmp/``
belongs -- must not hold back everyone else's acknowledged mail, nor keep
the journal out of use until someone repairs that mailbox.  So recovery
goes record by record and target by target; what cannot be restored is
moved here, durably, before the journal starts afresh, and every later
start tries it again until it is in its Maildir.

On disk, ``data_dir/journal/unrestored/<sequence>``: one file per journal
record, in the journal's own record format (``journal.encode``: its CRC
covers the paths and the message), naming only the targets still missing.
A file is replaced (``atomic_write``) when fewer targets are left and
removed when none is, so a message is never restored twice into one
mailbox and never lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from postoffice.storage.journal import JournalError, Record, encode, scan_segment
from postoffice.storage.safeio import atomic_write, fsync_dir

log = logging.getLogger("postoffice.journal")

HELD_DIR = "unrestored"


def read_held(directory: Path) -> list[tuple[Path, Record]]:
    """The records held in ``directory`` (``journal/unrestored``), oldest
    first.  A file that is not one intact record is left where it is, with a
    log line: it is never guessed at, and never deleted."""
    held: list[tuple[Path, Record]] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return held
    for name in names:
        if name.startswith("."):
            continue  # an atomic_write cut short
        path = directory / name
        try:
            records = list(scan_segment(path.read_bytes(), 0))
        except (OSError, JournalError) as exc:
            log.error("journal: held record %s cannot be read: %s; left in place", path, exc)
            continue
        if len(records) != 1:
            log.error("journal: held record %s is damaged; left in place", path)
            continue
        held.append((path, records[0]))
    held.sort(key=lambda item: item[1].seq)
    return held


def hold(directory: Path, record: Record, targets: Sequence[str]) -> None:
    """Keep ``record`` for ``targets`` (a subset of its own) durably in
    ``directory``, replacing what was held for it before.  Blocking."""
    directory.mkdir(mode=0o700, exist_ok=True)
    atomic_write(directory / str(record.seq), encode(record.seq, targets, record.data))


def release(directory: Path, seq: int) -> None:
    """Record ``seq`` is restored everywhere: forget it, durably."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / str(seq))
        fsync_dir(directory)
