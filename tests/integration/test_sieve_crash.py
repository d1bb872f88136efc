"""Sieve filing and a crash: kill -9 right after messages were filed, restart.

Small messages reach their Maildir through the journal, whose recovery
writes every record not yet retired back into ``new/``.  A message the
user's script files elsewhere is decided before the store and skips the
journal (delivery/sieve.py, storage/maildir.py), so a restart cannot bring
back an INBOX copy of a message that is already in its folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import send_until_killed
from tests.support.server import PostofficeServer

ALICE = "alice@example.test"


def tags_in(folder: Path) -> list[str]:
    return [
        p.read_bytes().split(b"X-Tag: ", 1)[1].split(b"\n", 1)[0].decode()
        for sub in ("new", "cur")
        if (folder / sub).is_dir()
        for p in (folder / sub).iterdir()
    ]


@pytest.mark.faults
def test_filed_messages_are_not_restored_to_inbox_after_a_crash(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, "alice-password-1")
    script = tmp_path / "work.sieve"
    script.write_text('require ["fileinto", "mailbox"];\nfileinto :create "Work";\n')
    srv.cli("sieve", "put", ALICE, str(script), "--name", "work", "--activate")
    srv.start()
    body = (b"w" * 78 + b"\r\n") * 20

    def tagged(tag: str) -> bytes:
        return f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + body

    acknowledged = send_until_killed(
        srv, clients=4, kill_after=60, message=tagged, rcpts=[ALICE], per_client=200
    )
    srv.start()  # recovery replays whatever the journal still holds
    maildir = srv.maildir(ALICE)
    inbox, work = tags_in(maildir), tags_in(maildir / ".Work")
    srv.stop()
    # Acknowledged: filed once, never back in INBOX.  (One the kill caught
    # between its store and its filing was never acknowledged: the client
    # sends it again, as after any crash before the 250.)
    assert [t for t in acknowledged if t in inbox] == []
    assert [t for t in acknowledged if t not in work] == []
    assert len(work) == len(set(work))
