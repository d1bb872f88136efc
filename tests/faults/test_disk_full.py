"""A full disk: 452 4.3.1 instead of 250, nothing corrupted, recovery once space returns.

Each test mounts a small filesystem of its own (tmpfs; a loop-mounted ext4
image where tmpfs cannot be mounted) over the server's mail or queue
directory, fills it with real deliveries, and checks that the server says
so (RFC 3463 4.3.1 "Mail system full"), leaves no debris, and accepts mail
again as soon as space is freed — here by the owner deleting mail over POP3,
as in real life.  Mounting needs root (as in CI); outside CI a test that
cannot mount is skipped, in CI it fails.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    make_server,
    queued,
    raw,
    submission,
    tls_context,
    wait_for,
)
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.faults

SIZE_KIB = 2048


@contextlib.contextmanager
def small_filesystem(path: Path, scratch: Path) -> Iterator[str]:
    """Mount a ``SIZE_KIB`` filesystem on ``path``; yields its kind; unmounts."""
    path.mkdir(parents=True, exist_ok=True)
    tried = []
    kind = ""
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_KIB}k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        kind = "tmpfs"
    else:
        tried.append(f"tmpfs: {result.stderr.strip()}")
        image = scratch / f"{path.name}.img"
        with open(image, "wb") as fh:
            fh.truncate(SIZE_KIB * 1024)
        steps = [
            ["mkfs.ext4", "-q", "-F", "-m", "0", str(image)],
            ["mount", "-o", "loop", str(image), str(path)],
        ]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                tried.append(f"{step[0]}: {result.stderr.strip()}")
                break
        else:
            kind = "ext4 loop"
    if not kind:
        reason = "cannot mount a small filesystem: " + "; ".join(tried)
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield kind
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def deliver(client: RawSmtp, rcpt: str, tag: str, size: int) -> tuple[int, list[str]]:
    assert client.cmd("MAIL FROM:<fill@remote.test>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    line = (tag.encode() * 80)[:78] + b"\r\n"
    client.send(f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + line * (size // 80) + b".\r\n")
    return client.reply()


def whole(path: Path) -> str:
    content = path.read_bytes()
    tag = re.search(rb"\nX-Tag: (\S+)\n", content).group(1)  # type: ignore[union-attr]
    body = content.split(b"\n\n", 1)[1]
    line = (tag * 80)[:78] + b"\n"
    assert body == line * (len(body) // len(line)) and body, f"damaged {path}"
    assert f",S={len(content)}," in path.name
    return tag.decode()


def debris(srv: PostofficeServer) -> list[Path]:
    return list((srv.data_dir / "mail").glob("*/*/tmp/*"))


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[PostofficeServer]:
    # No free-space reserve: these tests fill the disk to its last byte.
    server = make_server(tmp_path / "srv", limits={"min_free_space": 0})
    server.stop()  # the filesystems go in first
    yield server
    server.stop()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mail_answer(client: RawSmtp, params: str = "") -> tuple[int, list[str]]:
    """MAIL FROM's answer; the transaction is reset again."""
    answer = client.cmd(f"MAIL FROM:<fill@remote.test>{params}")
    assert client.cmd("RSET")[0] == 250
    return answer


def test_below_the_reserve_mail_is_refused_before_the_data(tmp_path: Path) -> None:
    reserve = SIZE_KIB * 1024 // 2
    server = make_server(tmp_path / "srv", limits={"min_free_space": reserve})
    server.stop()
    try:
        with small_filesystem(server.data_dir / "mail", tmp_path):
            server.start()
            mail = server.data_dir / "mail"
            client = raw(server)
            # Room for a message now, but not for one that says it is larger
            # than the free space above the reserve (RFC 1870 §6.1).
            too_big = free_bytes(mail) - reserve + 100_000
            assert mail_answer(client, f" SIZE={too_big}")[1][0].startswith("4.3.1")
            assert mail_answer(client, " SIZE=1000")[0] == 250
            sent = 0
            while free_bytes(mail) >= reserve:  # every one accepted: the disk never fills
                assert deliver(client, ALICE, f"m{sent:03d}", 40_000)[0] == 250
                sent += 1
                assert sent < 100
            assert wait_for(lambda: mail_answer(client)[0] == 452, 5), "never refused"
            code, lines = mail_answer(client)
            assert (code, lines[0][:5]) == (452, "4.3.1"), lines
            assert debris(server) == [] and len(server.messages(ALICE)) == sent
            # The owner deletes mail over POP3: above the reserve again, accepted again.
            pop = poplib.POP3_SSL(
                "127.0.0.1", server.ports["pop3s"], timeout=30, context=tls_context()
            )
            pop.user(ALICE)
            pop.pass_(ALICE_PW)
            for n in range(1, sent + 1):
                pop.dele(n)
            pop.quit()
            assert wait_for(lambda: mail_answer(client)[0] == 250, 5)
            assert deliver(client, BOB, "after", 40_000)[0] == 250
            client.cmd("QUIT")
            server.stop()
    finally:
        server.stop()
    assert "below the reserve" in server.log() and "Traceback" not in server.log()


@pytest.mark.parametrize("size", [20_000, 400_000], ids=["in-memory", "streamed"])
def test_full_mail_disk_is_452_and_recovers(
    srv: PostofficeServer, tmp_path: Path, size: int
) -> None:
    with small_filesystem(srv.data_dir / "mail", tmp_path):
        srv.start()
        client = raw(srv)
        acknowledged: list[str] = []
        refusal = None
        for i in range(2 * SIZE_KIB * 1024 // size + 5):  # more than fits
            code, lines = deliver(client, ALICE, f"m{i:03d}", size)
            if code != 250:
                refusal = (code, lines)
                break
            acknowledged.append(f"m{i:03d}")
        assert refusal is not None, "the disk never filled"
        assert refusal[0] == 452 and refusal[1][0].startswith("4.3.1"), refusal
        assert acknowledged, "nothing fitted at all"
        assert client.cmd("NOOP")[0] == 250  # the session survives
        assert debris(srv) == []
        assert sorted(whole(p) for p in srv.messages(ALICE)) == acknowledged
        # Another mailbox on the same disk: also 452, not a crash or a 451.
        code, lines = deliver(client, BOB, "bob-1", size)
        assert (code, lines[0][:5]) == (452, "4.3.1")

        # Alice fetches and deletes her mail over POP3: space comes back.
        pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], timeout=30, context=tls_context())
        pop.user(ALICE)
        pop.pass_(ALICE_PW)
        count, _ = pop.stat()
        assert count == len(acknowledged)
        for n in range(1, count + 1):
            pop.dele(n)
        pop.quit()
        code, _ = deliver(client, BOB, "bob-2", size)
        assert code == 250
        assert [whole(p) for p in srv.messages(BOB)] == ["bob-2"]
        assert debris(srv) == []
        client.cmd("QUIT")
        srv.stop()
    assert "Traceback" not in srv.log()


def test_full_queue_disk_is_452_and_recovers(srv: PostofficeServer, tmp_path: Path) -> None:
    with small_filesystem(srv.data_dir / "queue", tmp_path):
        # Nowhere to deliver to (the port is closed): mail stays queued.
        text = srv.config.read_text()
        srv.config.write_text(
            text + '\n[relay]\nsmarthost = "127.0.0.1:9"\nretry_schedule = [3600]\n'
        )
        srv.start()
        client = submission(srv)
        code = 250
        sent = 0
        for i in range(40):
            assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
            assert client.cmd(f"RCPT TO:<friend{i}@remote.test>")[0] == 250
            assert client.cmd("DATA")[0] == 354
            client.send(
                b"From: alice@example.test\r\n\r\n" + (b"q" * 78 + b"\r\n") * 2000 + b".\r\n"
            )
            code, lines = client.reply()
            if code != 250:
                break
            sent += 1
        assert code == 452 and lines[0].startswith("4.3.1"), (code, lines)
        assert 0 < sent == len(queued(srv))
        assert not list((srv.data_dir / "queue" / "tmp").glob("*"))  # no debris
        # An administrator removes one queued message: there is room again.
        victim = queued(srv)[0].name.removesuffix(".msg")
        srv.cli("queue", "remove", victim)
        assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
        assert client.cmd("RCPT TO:<late@remote.test>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        assert client.cmd("From: alice@example.test\r\n\r\nsmall\r\n.")[0] == 250
        assert len(queued(srv)) == sent
        srv.stop()
