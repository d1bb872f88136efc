"""Spam to Junk and the users' Sieve scripts, in a real server with a filter.

A hook (filter_hooks/verdict_hook.py) marks messages ``X-Spam: Yes``, which
files them in Junk ([filters] junk_folder).  The user's script still runs on
them and sees that header: an explicit fileinto wins, a keep leaves the
message in Junk, and no vacation reply goes to a spam sender (backscatter).
"""

from __future__ import annotations

import os
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.server import PostofficeServer

HOOKS_DIR = Path(__file__).parent / "filter_hooks"
ENV = {"PYTHONPATH": os.pathsep.join([str(HOOKS_DIR), os.environ.get("PYTHONPATH", "")])}
IVY, JAY, KAY, LEE = "ivy@example.test", "jay@example.test", "kay@example.test", "lee@example.test"
SCRIPT = """require ["fileinto", "mailbox", "vacation"];
if header :contains "subject" "to-work" { fileinto :create "Work"; stop; }
if allof (header :is "X-Spam" "Yes", header :contains "subject" "to-spam") {
  fileinto :create "Spam"; stop;
}
vacation :days 1 "ivy is away";
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    root = tmp_path_factory.mktemp("sieve-junk")
    server = PostofficeServer(
        root / "po", sections={"filters": {"hooks": ["verdict_hook:Scripted"]}}
    )
    for address in (IVY, JAY, KAY, LEE):
        server.add_user(address, "a-password-123")
    script = root / "ivy.sieve"
    script.write_text(SCRIPT)
    server.cli("sieve", "put", IVY, str(script), "--name", "rules", "--activate")
    server.start(env=ENV)
    try:
        yield server
    finally:
        server.stop()


def send(srv: PostofficeServer, sender: str, subject: str, spam: bool) -> None:
    op = "X-Test-Op: spam\r\n" if spam else ""
    data = f"From: {sender}\r\nTo: {IVY}\r\nSubject: {subject}\r\n{op}\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
        client.sendmail(sender, [IVY], data.encode())


def with_marker(folder: Path, marker: bytes) -> list[Path]:
    return [
        p
        for sub in ("new", "cur")
        if (folder / sub).is_dir()
        for p in (folder / sub).iterdir()
        if marker in p.read_bytes()
    ]


def test_spam_keep_stays_in_junk_and_fileinto_wins(srv: PostofficeServer) -> None:
    ivy = srv.maildir(IVY)
    send(srv, JAY, "junk-keep-1", spam=True)
    send(srv, JAY, "junk-to-work-2", spam=True)
    send(srv, JAY, "junk-to-spam-3", spam=True)
    send(srv, JAY, "junk-to-spam-4 not spam", spam=False)
    assert len(with_marker(ivy / ".Junk", b"junk-keep-1")) == 1, srv.log()
    assert len(with_marker(ivy / ".Work", b"junk-to-work-2")) == 1
    # The script saw the filter's X-Spam header: only the spam one went to Spam.
    assert len(with_marker(ivy / ".Spam", b"junk-to-spam-3")) == 1
    assert len(with_marker(ivy, b"junk-to-spam-4")) == 1
    assert with_marker(ivy, b"junk-keep-1") == [] and with_marker(ivy / ".Junk", b"junk-to") == []


def test_no_vacation_reply_to_spam(srv: PostofficeServer) -> None:
    send(srv, KAY, "junk-vacation-spam", spam=True)
    send(srv, LEE, "junk-vacation-ham", spam=False)
    # The ham's sender is answered (the vacation works) ...
    lee = srv.maildir(LEE)
    assert wait_for(lambda: len(with_marker(lee, b"ivy is away")) == 1), srv.log()
    assert len(with_marker(srv.maildir(IVY) / ".Junk", b"junk-vacation-spam")) == 1
    time.sleep(2)
    # ... the spam's is not.
    assert with_marker(srv.maildir(KAY), b"ivy is away") == []
