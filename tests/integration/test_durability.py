"""A 250 means on disk: SIGKILL while clients send, restart, count what is stored."""

from __future__ import annotations

import smtplib
import threading
import time
from pathlib import Path

import pytest

from postoffice.storage.journal import pending_records
from tests.support.server import PostofficeServer


@pytest.mark.faults
def test_sigkill_during_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        body = (b"x" * 78 + b"\r\n") * 250  # 20 kB in 80-octet lines
        for i in range(200):  # bounded; the kill usually comes first
            if stop.is_set():
                return
            tag = f"c{n}-m{i}"
            msg = f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + body + b"\r\n"
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                    s.sendmail("load@remote.test", ["alice@example.test"], msg)
            except (OSError, smtplib.SMTPException):
                return
            with lock:
                acknowledged.append(tag)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 40

    srv.start()  # recovery on restart must not disturb stored mail
    stored: dict[str, int] = {}
    for path in srv.messages("alice@example.test"):
        content = path.read_bytes()
        tag = content.split(b"X-Tag: ", 1)[1].split(b"\n", 1)[0].decode()
        stored[tag] = stored.get(tag, 0) + 1
        assert content.endswith((b"x" * 78 + b"\n") * 250 + b"\n"), f"partial file {path}"
    srv.stop()
    missing = [t for t in acknowledged if t not in stored]
    assert missing == []
    assert all(count == 1 for count in stored.values())


@pytest.mark.faults
def test_unflushed_files_cut_short_by_a_power_cut_are_restored(tmp_path: Path) -> None:
    """kill -9 under load, then do to every file the journal had not yet retired
    what a power cut may do to data never flushed (empty it): the restart
    writes each acknowledged message back whole, once."""
    srv = PostofficeServer(tmp_path)
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    body = (b"y" * 78 + b"\r\n") * 40

    def client(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
            for i in range(500):  # bounded; the kill comes first
                if stop.is_set():
                    return
                tag = f"c{n}-m{i}"
                msg = f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + body
                try:
                    s.sendmail("load@remote.test", ["alice@example.test"], msg)
                except (OSError, smtplib.SMTPException):
                    return
                with lock:
                    acknowledged.append(tag)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 300

    unretired = pending_records(srv.data_dir / "journal")
    for record in unretired:
        for target in record.targets:
            path = srv.data_dir / "mail" / target
            if path.exists():
                path.write_bytes(b"")
    srv.start()
    stored: dict[str, int] = {}
    for path in srv.messages("alice@example.test"):
        content = path.read_bytes()
        tag = content.split(b"X-Tag: ", 1)[1].split(b"\n", 1)[0].decode()
        stored[tag] = stored.get(tag, 0) + 1
        assert content.endswith(body.replace(b"\r\n", b"\n")), f"partial file {path}"
    assert pending_records(srv.data_dir / "journal") == []
    srv.stop()
    assert [t for t in acknowledged if t not in stored] == []
    assert all(count == 1 for count in stored.values())
    print(f"{len(acknowledged)} acknowledged, {len(unretired)} restored from the journal")
