"""clean_stale_tmp: what a crash left in tmp/ at start."""

from __future__ import annotations

import os
import time
from pathlib import Path

from postoffice.storage.maildir import clean_stale_tmp


def mailbox(mail: Path, name: str) -> Path:
    box = mail / "example.test" / name
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    return box


def test_a_delivery_cut_off_between_mailboxes_is_undone_everywhere(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    alice, bob, carol = (mailbox(mail, n) for n in ("alice", "bob", "carol"))
    tmp = alice / "tmp" / "1.M1P1Q1.host"
    tmp.write_bytes(b"Subject: cut off\n\nbody\n")
    os.link(tmp, bob / "new" / "2.M2P1Q2.host,S=24,W=27")  # linked into bob's, then the crash
    kept = carol / "new" / "3.M3P1Q3.host,S=5,W=5"
    kept.write_bytes(b"hello")
    clean_stale_tmp(mail)
    assert list((alice / "tmp").iterdir()) == []
    assert list((bob / "new").iterdir()) == []  # neither recipient has it
    assert list((carol / "new").iterdir()) == [kept]


def test_a_link_within_one_mailbox_and_fresh_tmp_files_are_left(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    alice = mailbox(mail, "alice")
    # A qmail-style agent links tmp/ to new/ in the same mailbox, then unlinks tmp/.
    tmp = alice / "tmp" / "1.M1P1Q1.host"
    tmp.write_bytes(b"x")
    os.link(tmp, alice / "new" / "1.M1P1Q1.host")
    fresh = alice / "tmp" / "2.M2P1Q2.host"
    fresh.write_bytes(b"being written")
    old = alice / "tmp" / "3.M3P1Q3.host"
    old.write_bytes(b"left 2 days ago")
    two_days_ago = time.time() - 48 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    report = clean_stale_tmp(mail)
    assert (alice / "new" / "1.M1P1Q1.host").exists()
    assert fresh.exists()
    assert not old.exists()
    assert report.removed_tmp == [old]
