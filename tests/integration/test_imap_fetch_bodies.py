"""FETCH of many whole messages, plain and IMAPS, byte for byte.

The session writes a message's octets as a chunk of their own (never copied
into the response line) in batches: plain in one writev, under TLS joined in
64 KiB pieces (net/connection.py ``writelines``).  These tests read every
literal back with imaplib and compare it with the stored file in its wire
form (RFC 9051 §4.3 literals, LF and CRLF -> CRLF, a bare CR kept), across
batch and piece boundaries, with items before, after and between literals.
"""

from __future__ import annotations

import imaplib
import os
import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.imap import ALICE, ALICE_PW, context
from tests.support.server import PostofficeServer

COUNT = 300  # several FETCH batches (16, 32, 64, 128, then the rest)


def _stored(i: int) -> bytes:
    """Message ``i`` as a delivery agent left it: LF endings, sizes from a
    few octets to 200 KiB (over the 64 KiB TLS piece), one stored with CRLF
    and one with a bare CR."""
    lines = (i * 37) % 300 if i != 7 else 2600  # message 7: about 200 KiB
    body = "".join(f"line {n} of message {i} {'x' * 70}\n" for n in range(lines))
    text = f"From: a@example.test\nSubject: m{i}\n\n{body}".encode()
    if i == 3:
        text = text.replace(b"\n", b"\r\n")
    if i == 5:
        text += b"a bare\rcarriage return\n"
    return text


def _wire(stored: bytes) -> bytes:
    return stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = PostofficeServer(
        tmp_path_factory.mktemp("imap-bodies"),
        sections={"auth": {"allow_plaintext_loopback": True}},
    )
    server.add_user(ALICE, ALICE_PW)
    server.start()
    maildir = server.maildir(ALICE)
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    now = int(time.time())
    for i in range(COUNT):
        data = _stored(i)
        (maildir / "new" / f"{now}.M{i:05d}P{os.getpid()}.test,S={len(data)}").write_bytes(data)
    yield server
    server.stop()


def _client(srv: PostofficeServer, transport: str) -> imaplib.IMAP4:
    if transport == "imaps":
        return imaplib.IMAP4_SSL(
            "127.0.0.1", srv.ports["imaps"], ssl_context=context(srv), timeout=30
        )
    return imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=30)


def _by_subject(data: bytes) -> int:
    found = re.search(rb"Subject: m(\d+)\r\n", data)
    assert found is not None, data[:200]
    return int(found.group(1))


@pytest.mark.parametrize("transport", ["plain", "imaps"])
def test_every_body_comes_back_byte_for_byte(srv: PostofficeServer, transport: str) -> None:
    client = _client(srv, transport)
    client.login(ALICE, ALICE_PW)
    assert client.select("INBOX", readonly=True) == ("OK", [str(COUNT).encode()])
    typ, data = client.uid("FETCH", "1:*", "(RFC822.SIZE BODY.PEEK[] FLAGS)")
    assert typ == "OK"
    seen: dict[int, bytes] = {}
    for i in range(0, len(data), 2):
        head, body = data[i]
        after = data[i + 1]
        assert isinstance(head, bytes) and isinstance(body, bytes) and isinstance(after, bytes)
        size = re.search(rb"RFC822\.SIZE (\d+) BODY\[\] \{(\d+)\}$", head)
        assert size is not None, head
        assert int(size.group(1)) == int(size.group(2)) == len(body)
        # The items after the literal (UID FETCH adds UID), then the end.
        assert re.fullmatch(rb" FLAGS \([^()]*\) UID \d+\)", after), after
        seen[_by_subject(body)] = body
    assert sorted(seen) == list(range(COUNT))
    for i, body in seen.items():
        assert body == _wire(_stored(i)), i
    client.logout()


@pytest.mark.parametrize("transport", ["plain", "imaps"])
def test_two_literals_in_one_response(srv: PostofficeServer, transport: str) -> None:
    client = _client(srv, transport)
    client.login(ALICE, ALICE_PW)
    client.select("INBOX", readonly=True)
    typ, data = client.fetch("1:40", "(BODY.PEEK[HEADER] UID BODY.PEEK[TEXT])")
    assert typ == "OK"
    count = 0
    for i in range(0, len(data), 3):
        (head, header), (middle, text), end = data[i], data[i + 1], data[i + 2]
        assert isinstance(head, bytes) and isinstance(middle, bytes)
        assert re.fullmatch(rb"\d+ \(BODY\[HEADER\] \{\d+\}", head), head
        assert re.fullmatch(rb" UID \d+ BODY\[TEXT\] \{\d+\}", middle), middle
        assert end == b")"
        assert isinstance(header, bytes) and isinstance(text, bytes)
        assert header + text == _wire(_stored(_by_subject(header)))
        count += 1
    assert count == 40
    client.logout()


def _pipelined(srv: PostofficeServer, commands: list[bytes]) -> bytes:
    """Send ``commands`` (tagged t0, t1, ...) in one write after LOGIN and
    SELECT, as mbsync pipelines them; everything up to the last tagged OK."""
    sock = socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=30)
    try:
        script = [b'l LOGIN "%s" "%s"' % (ALICE.encode(), ALICE_PW.encode()), b"s SELECT INBOX"]
        script += [b"t%d %s" % (n, c) for n, c in enumerate(commands)]
        sock.sendall(b"".join(line + b"\r\n" for line in script))
        last = b"\r\nt%d " % (len(commands) - 1)
        data = b""
        deadline = time.monotonic() + 30
        while last not in data or not data.endswith(b"\r\n"):
            assert time.monotonic() < deadline, data[-300:]
            chunk = sock.recv(1 << 20)
            assert chunk, data[-300:]
            data += chunk
        return data
    finally:
        sock.close()


def _bodies(data: bytes) -> dict[int, bytes]:
    """UID -> BODY[] of every FETCH response in ``data``."""
    found: dict[int, bytes] = {}
    for match in re.finditer(rb"\* \d+ FETCH \(BODY\[\] \{(\d+)\}\r\n", data):
        start = match.end()
        end = start + int(match.group(1))
        uid = re.match(rb" UID (\d+)\)\r\n", data[end : end + 20])
        assert uid is not None, data[end : end + 20]
        found[int(uid.group(1))] = data[start:end]
    return found


def test_one_message_per_command_in_order_and_not(srv: PostofficeServer) -> None:
    # In order (read ahead after the second), then backwards, then in order
    # again with other commands between (each drops what was read ahead).
    uids = [*range(1, 80), *range(120, 100, -1), 200, 201, 202, 203]
    commands = [b"UID FETCH %d (BODY.PEEK[])" % u for u in uids]
    commands[-2:-2] = [b"NOOP"]
    commands[-4:-4] = [b"UID FETCH 199 (FLAGS)"]
    data = _pipelined(srv, commands)
    assert data.count(b" OK ") >= len(commands) + 2, data[-300:]
    bodies = _bodies(data)
    assert sorted(bodies) == sorted(uids), data[:600]
    # UIDs follow the files' order (named by delivery time, then number).
    order = sorted(os.listdir(srv.maildir(ALICE) / "new"), key=lambda n: n.split(".")[1])
    for uid, body in bodies.items():
        assert body == _wire((srv.maildir(ALICE) / "new" / order[uid - 1]).read_bytes()), uid
