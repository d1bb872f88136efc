"""Slow-drip clients (slowloris): a byte now and then must not hold a session open.

The timeouts (``smtp_timeout``, ``smtp_data_timeout``, ``pop3_timeout``)
bound how long a client may take to send a whole line, not the silence
between two bytes: RFC 5321 §4.5.3.2.7 waits for the next *command* and
RFC 1939 §3 restarts its timer on each *command*.  Each test dribbles one
byte every half second, for far longer than the timeout (2 s here), and
expects the server to hang up long before the dribble ends.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import make_server, tls_context
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.load

TIMEOUT = 2.0
DRIP = 0.5  # seconds between bytes
DRIPS = 40  # 20 s of dribbling: ten times the timeout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    srv = make_server(
        tmp_path_factory.mktemp("slow"),
        limits={"smtp_timeout": TIMEOUT, "smtp_data_timeout": TIMEOUT, "pop3_timeout": TIMEOUT},
    )
    yield srv
    srv.stop()


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def dribble(sock: socket.socket, payload: bytes) -> tuple[int, bytes]:
    """Send ``payload`` a byte at a time; return how many bytes went out
    before the server answered or hung up, and what it said."""
    for sent, byte in enumerate(payload[:DRIPS]):
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            try:
                return sent, sock.recv(4096)
            except OSError:
                return sent, b""
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return sent, b""
        time.sleep(DRIP)
    return DRIPS, b""


def test_dribbled_smtp_command(server: PostofficeServer) -> None:
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as sock:
        assert read_line(sock).startswith(b"220")
        sent, said = dribble(sock, b"NOOP " + b"x" * 100)
        assert sent < DRIPS, "a dribbling client was never cut off"
        assert said.startswith(b"421 4.4.2") or said == b"", said


def test_dribbled_smtp_message(server: PostofficeServer) -> None:
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as sock:
        assert read_line(sock).startswith(b"220")
        sock.sendall(b"EHLO slow.test\r\nMAIL FROM:<a@remote.test>\r\n")
        sock.sendall(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        for _ in range(100):
            if read_line(sock).startswith(b"354"):
                break
        sent, said = dribble(sock, b"Subject: slow\r\n\r\n" + b"y" * 100)
        assert sent < DRIPS, "a dribbling client was never cut off"
        assert said.startswith(b"421 4.4.2") or said == b"", said
    assert server.messages("alice@example.test") == []


@pytest.mark.parametrize("port", ["pop3", "pop3s"])
def test_dribbled_pop3_command(server: PostofficeServer, port: str) -> None:
    raw = socket.create_connection(("127.0.0.1", server.ports[port]), timeout=10)
    sock = tls_context().wrap_socket(raw) if port == "pop3s" else raw
    try:
        assert read_line(sock).startswith(b"+OK")
        sent, said = dribble(sock, b"USER " + b"x" * 100)
        assert sent < DRIPS, "a dribbling client was never cut off"
        assert said == b"", said  # RFC 1939 §3: closed without a reply
    finally:
        sock.close()


def test_lines_that_do_arrive_keep_a_slow_client_alive(server: PostofficeServer) -> None:
    # The other side of the rule: whole commands, each within the timeout,
    # are an honest (if slow) client.
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as sock:
        assert read_line(sock).startswith(b"220")
        for _ in range(3):
            time.sleep(TIMEOUT * 0.6)
            sock.sendall(b"NOOP\r\n")
            assert read_line(sock).startswith(b"250")


def test_dribbled_tls_handshake_is_cut_off(tmp_path: Path) -> None:
    # A TLS ClientHello sent a byte at a time: the handshake has its own
    # bound (30 s), after which the connection is dropped.
    srv = make_server(tmp_path)
    try:
        hello = ssl_client_hello()
        with socket.create_connection(("127.0.0.1", srv.ports["submissions"]), timeout=10) as sock:
            started = time.monotonic()
            closed = False
            for byte in hello[:200]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                readable, _, _ = select.select([sock], [], [], 0.5)
                if readable:
                    try:
                        closed = sock.recv(4096) == b""
                    except OSError:
                        closed = True
                    if closed:
                        break
            assert closed, "a dribbled handshake was never cut off"
            assert time.monotonic() - started < 100  # well before the 200-byte dribble ends
    finally:
        srv.stop()


def ssl_client_hello() -> bytes:
    """The first bytes a real TLS client sends (its ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls_context().wrap_bio(incoming, outgoing, server_hostname="mail.example.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()
