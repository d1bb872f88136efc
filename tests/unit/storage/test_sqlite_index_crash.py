"""kill -9 in the middle of a sync loop never makes the index hand a UID out twice.

A child process delivers files into a real Maildir and syncs in a loop,
printing each UID once its sync has returned (the moment a session would
tell a client).  The parent kills it with SIGKILL at random moments and
starts it again; every UID ever printed must name one file only, and the
index afterwards must agree with everything printed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from postoffice.storage.index_files import MaildirFolderFiles
from postoffice.storage.sqlite_index import SqliteImapIndex

CHILD = """
import os, sys
from pathlib import Path
from postoffice.storage.index_files import MaildirFolderFiles
from postoffice.storage.sqlite_index import SqliteImapIndex

maildir = Path(sys.argv[1])
start = int(sys.argv[2])
index = SqliteImapIndex.for_maildir(maildir)
files = MaildirFolderFiles(maildir)
n = start
while True:
    for _ in range(3):
        name = f"{1700000000 + n}.M0P{os.getpid()}Q{n}.host,S=1"
        with open(maildir / "tmp" / name, "wb") as fh:
            fh.write(b"x")
        os.rename(maildir / "tmp" / name, maildir / "new" / name)
        n += 1
    if n % 7 == 0:
        victim = sorted(os.listdir(maildir / "new"))[0]
        os.unlink(maildir / "new" / victim)
    result = index.sync("INBOX", files)
    for record in result.added:
        sys.stdout.write(f"{record.uid} {record.stem}\\n")
    sys.stdout.flush()
"""


def test_kill_9_during_syncs_never_reuses_a_uid(tmp_path: Path) -> None:
    maildir = tmp_path / "maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    printed: dict[int, str] = {}
    rng = random.Random(13)
    start = 0
    for _round in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(maildir), str(start)],
            stdout=subprocess.PIPE,
            env=env,
        )
        time.sleep(0.3 + rng.random() * 0.4)  # the interpreter starts, then a few syncs
        os.kill(child.pid, signal.SIGKILL)
        out, _err = child.communicate()
        assert child.returncode == -signal.SIGKILL
        lines = out.decode().splitlines()
        if lines and not lines[-1].endswith(",S=1"):
            lines.pop()  # cut mid-line by the kill
        for line in lines:
            uid_text, stem = line.split(" ")
            uid = int(uid_text)
            assert printed.setdefault(uid, stem) == stem, f"UID {uid} given twice"
        start += 10_000  # the next child's names never repeat the last one's
    assert len(printed) > 20  # the children really did work
    assert len(set(printed.values())) == len(printed)  # one UID per file, too
    index = SqliteImapIndex.for_maildir(maildir)
    try:
        result = index.sync("INBOX", MaildirFolderFiles(maildir))
        known = {r.uid: r.stem for r in index.messages("INBOX")}
        vanished = set(index.vanished_since("INBOX", 0))
        for uid, stem in printed.items():
            assert known.get(uid, stem) == stem
            assert uid in known or uid in vanished
        uids = sorted([*known, *vanished])
        assert uids == sorted(set(uids))
        assert result.folder.uidnext > max(uids)
        check = index._conn.execute("PRAGMA integrity_check").fetchone()[0]
        assert check == "ok"
    finally:
        index.close()


BULK_CHILD = """
import sys
from pathlib import Path
from postoffice.storage.sqlite_index import BULK_ROWS, SqliteImapIndex
from tests.unit.storage.index_support import ListedFiles, stem

index = SqliteImapIndex.for_maildir(Path(sys.argv[1]))
files = ListedFiles([stem(n) for n in range(BULK_ROWS + 100)])
while True:
    # Each sync of "B" is a first one into an empty table: the bulk path,
    # which drops and rebuilds messages_stem inside its transaction.
    result = index.sync("B", files)
    sys.stdout.write(f"{result.folder.uidvalidity}\\n")
    sys.stdout.flush()
    index.delete_folder("B")
"""


def test_kill_9_during_bulk_syncs_keeps_index_and_uids(tmp_path: Path) -> None:
    from postoffice.storage.sqlite_index import BULK_ROWS
    from tests.unit.storage.index_support import ListedFiles, stem

    maildir = tmp_path / "maildir"
    maildir.mkdir()
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    rng = random.Random(7)
    told: set[int] = set()
    names = [stem(n) for n in range(BULK_ROWS + 100)]
    for _round in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", BULK_CHILD, str(maildir)], stdout=subprocess.PIPE, env=env
        )
        time.sleep(0.4 + rng.random() * 0.6)
        os.kill(child.pid, signal.SIGKILL)
        out, _err = child.communicate()
        told |= {int(line) for line in out.decode().split("\n")[:-1]}
        index = SqliteImapIndex.for_maildir(maildir)
        try:
            conn = index._conn
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'messages_stem'"
            ).fetchone() == (1,)
            state = index.folder("B")
            if state is not None and state.uidvalidity in told:
                # A sync that returned: its UIDs are all there, as given.
                got = [(r.uid, r.stem) for r in index.messages("B")]
                assert got == [(n + 1, s) for n, s in enumerate(names)]
            elif state is not None:  # killed before it returned: all or nothing
                assert state.messages in (0, len(names))
        finally:
            index.close()
    assert told  # the children really did bulk syncs
    index = SqliteImapIndex.for_maildir(maildir)
    try:
        assert index.sync("C", ListedFiles(names)).folder.messages == len(names)
    finally:
        index.close()
