"""kill -9 during DATA and during local delivery, then restart.

The promise (SPEC "Storage"): a 250 means the message is on stable storage.
So after SIGKILL at any moment and a restart, every acknowledged message is
in every recipient's Maildir exactly once and complete; nothing half-written
is ever visible in ``new/`` or ``cur/`` (a reader sees only renamed, whole
files); and whatever was still in transit when the server died is simply
not there.  tests/integration/test_durability.py kills during small
single-recipient messages; here the kills hit streaming (spilled) messages,
hard-linked multi-recipient messages, and sessions in the middle of DATA.
"""

from __future__ import annotations

import hashlib
import re
import smtplib
import threading
from pathlib import Path

import pytest

from tests.support.helpers import (
    ALICE,
    BOB,
    make_server,
    queued,
    raw,
    send_until_killed,
    submission,
    wait_for,
)
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.faults

LINE = b"m" * 78 + b"\r\n"


def body_for(tag: str, lines: int) -> bytes:
    """A body whose every line names the tag, so a file tells what it should hold."""
    seed = hashlib.sha256(tag.encode()).hexdigest().encode()
    return b"".join(seed[:60] + b"%08d\r\n" % i for i in range(lines))


def message(tag: str, lines: int) -> bytes:
    return f"Subject: {tag}\r\nX-Tag: {tag}\r\nX-Lines: {lines}\r\n\r\n".encode() + body_for(
        tag, lines
    )


def check_file(path: Path) -> str:
    """The tag of a stored message, after checking it is whole and its name is true."""
    content = path.read_bytes()
    tag = re.search(rb"\nX-Tag: (\S+)\n", content).group(1).decode()  # type: ignore[union-attr]
    lines = int(re.search(rb"\nX-Lines: (\d+)\n", content).group(1))  # type: ignore[union-attr]
    expected = body_for(tag, lines).replace(b"\r\n", b"\n")
    assert content.endswith(b"\n\n" + expected), f"partial or damaged file {path}"
    size = int(re.search(r",S=(\d+)", path.name).group(1))  # type: ignore[union-attr]
    crlf = int(re.search(r",W=(\d+)", path.name).group(1))  # type: ignore[union-attr]
    assert size == len(content) and crlf == len(content) + content.count(b"\n"), path
    return tag


def stored_tags(srv: PostofficeServer, address: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in srv.messages(address):
        tag = check_file(path)
        counts[tag] = counts.get(tag, 0) + 1
    return counts


def load_until_killed(srv: PostofficeServer, kill_after: int, round_: int) -> list[str]:
    """Clients send big two-recipient messages until the server is killed
    after ``kill_after`` acknowledgements; returns the acknowledged tags."""

    def big_or_small(tag: str) -> bytes:
        n, i = (int(part[1:]) for part in tag.split("-")[1:])
        return message(tag, 4000 if (n + i) % 2 else 200)  # 320 kB (streams to tmp/) or 16 kB

    return send_until_killed(
        srv,
        clients=6,
        kill_after=kill_after,
        message=big_or_small,
        rcpts=[ALICE, BOB],
        prefix=f"r{round_}-",
    )


def test_kill_9_during_local_delivery_loses_and_repeats_nothing(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    acknowledged: list[str] = []
    try:
        # Three kills at different depths of the load, each followed by a restart.
        for round_, kill_after in enumerate((5, 17, 31)):
            if round_:
                srv.start()
            acknowledged += load_until_killed(srv, kill_after, round_)
        srv.start()
        for address in (ALICE, BOB):
            stored = stored_tags(srv, address)
            assert [t for t in acknowledged if t not in stored] == []
            assert {t: n for t, n in stored.items() if n != 1} == {}
        # Both recipients got the same set (one file, hard-linked, or neither).
        assert stored_tags(srv, ALICE).keys() == stored_tags(srv, BOB).keys()
    finally:
        srv.stop()


def test_kill_9_during_data_leaves_nothing_visible(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    try:
        clients = []
        # Sessions stopped at every point of a transaction: inbound small and
        # streaming, submission to a local and to a remote recipient.
        for port, rcpt, lines in (
            ("smtp", ALICE, 10),
            ("smtp", ALICE, 20_000),  # 1.6 MB: already streaming to tmp/
            ("submission", BOB, 20_000),
            ("submission", "friend@remote.test", 20_000),  # streaming into the queue
        ):
            client = submission(srv) if port == "submission" else raw(srv)
            sender = ALICE if port == "submission" else "a@remote.test"
            assert client.cmd(f"MAIL FROM:<{sender}>")[0] == 250
            assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
            assert client.cmd("DATA")[0] == 354
            client.send(message(f"unfinished-{rcpt}-{lines}", lines))  # no final dot
            clients.append(client)
        spilled = lambda: len(list((srv.data_dir / "mail").glob("*/*/tmp/*"))) >= 2  # noqa: E731
        assert wait_for(spilled)
        srv.kill()
        srv.start()
        for address in (ALICE, BOB):
            assert srv.messages(address) == []
        assert queued(srv) == []
        assert not any((srv.data_dir / "queue" / "tmp").glob("*")), "queue tmp/ not cleared"
        # The restarted server works.
        client = raw(srv)
        client.cmd("MAIL FROM:<a@remote.test>")
        client.cmd(f"RCPT TO:<{ALICE}>")
        client.cmd("DATA")
        assert client.cmd(message("after", 5).decode() + ".")[0] == 250
        assert stored_tags(srv, ALICE) == {"after": 1}
    finally:
        srv.stop()


def test_kill_9_during_submission_keeps_every_queued_message_whole(tmp_path: Path) -> None:
    """Submitted mail for remote recipients, many sessions at once (so commits
    are grouped): after SIGKILL every acknowledged message is in the queue
    exactly once and whole, nothing half-written is a ``.msg``, and the
    restarted server recovers them all."""
    import socket
    import ssl

    from tests.support.helpers import ALICE_PW, tls_context

    with socket.socket() as s:  # a port nobody listens on: deliveries wait
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    srv = make_server(
        tmp_path, relay={"smarthost": f"127.0.0.1:{closed}", "retry_schedule": [3600]}
    )
    acknowledged: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=20) as s:
                s.starttls(context=tls_context())
                s.login(ALICE, ALICE_PW)
                for i in range(200):  # bounded; the kill comes first
                    tag = f"q-c{n}-m{i}"
                    lines = 1000 if i % 5 == 4 else 100  # 80 kB (spills) or 8 kB
                    s.sendmail(
                        ALICE,
                        [f"r{n}.{i}@remote.test"],
                        f"From: {ALICE}\r\n".encode() + message(tag, lines),
                    )
                    with lock:
                        acknowledged.append(tag)
        except (OSError, smtplib.SMTPException, ssl.SSLError):
            return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: len(acknowledged) >= 60, timeout=60)
        srv.kill()
        for t in threads:
            t.join(30)
        with lock:
            acked = list(acknowledged)
        found: dict[str, int] = {}
        for path in queued(srv):
            content = path.read_bytes()
            first, _, stored = content.partition(b"\n")
            assert first.startswith(b"postoffice-queue 1 "), path
            tag = re.search(rb"\nX-Tag: (\S+)\n", stored).group(1).decode()  # type: ignore[union-attr]
            lines = int(re.search(rb"\nX-Lines: (\d+)\n", stored).group(1))  # type: ignore[union-attr]
            expected = body_for(tag, lines).replace(b"\r\n", b"\n")
            assert stored.endswith(b"\n\n" + expected), f"partial or damaged file {path}"
            found[tag] = found.get(tag, 0) + 1
        assert [t for t in acked if t not in found] == []
        assert {t: n for t, n in found.items() if n != 1} == {}
        srv.start()
        listing = srv.cli("queue", "list").stdout
        assert f"{len(found)} message(s) in the queue" in listing
    finally:
        srv.stop()
