"""A 250 means on disk: SIGKILL while clients send, restart, count what is stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import send_until_killed
from tests.support.journal import pending_records
from tests.support.server import PostofficeServer


@pytest.mark.faults
def test_sigkill_during_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    body = (b"x" * 78 + b"\r\n") * 250  # 20 kB in 80-octet lines

    def tagged(tag: str) -> bytes:
        return f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + body + b"\r\n"

    acknowledged = send_until_killed(
        srv,
        clients=8,
        kill_after=40,
        message=tagged,
        rcpts=["alice@example.test"],
        per_client=200,
    )

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
    body = (b"y" * 78 + b"\r\n") * 40

    def tagged(tag: str) -> bytes:
        return f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + body

    acknowledged = send_until_killed(
        srv,
        clients=8,
        kill_after=300,
        message=tagged,
        rcpts=["alice@example.test"],
        per_client=500,
        one_connection=True,
    )

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
