"""COMPRESS=DEFLATE (RFC 4978) against the real server, with zlib as the client.

A raw client (``tests.support.imap.DeflateImap``) that does DEFLATE itself,
over plain loopback and inside TLS: the capability after login, the OK
sent plain and everything after it raw DEFLATE both ways, a second
COMPRESS refused with COMPRESSIONACTIVE (RFC 4978 §3, RFC 5530 §3), an
unknown mechanism BAD, a command that arrived in the same packet as
COMPRESS inflated and answered, and a big FETCH that comes back smaller
than it is.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator

import pytest

from tests.support.helpers import make_server, wait_for
from tests.support.imap import ALICE, ALICE_PW, DeflateImap, imaps
from tests.support.server import PostofficeServer


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = make_server(
        tmp_path_factory.mktemp("imap-compress"), auth={"allow_plaintext_loopback": True}
    )
    yield server
    server.stop()


def logged_in(srv: PostofficeServer, port: str) -> DeflateImap:
    client = DeflateImap.connect(srv, port)
    assert b"COMPRESS=" not in client.greeting  # offered once authenticated, as Dovecot
    reply = client.cmd("L", f'LOGIN "{ALICE}" "{ALICE_PW}"'.encode())
    assert reply[-1].startswith(b"L OK [CAPABILITY ") and b" COMPRESS=DEFLATE" in reply[-1]
    assert b" STARTTLS" not in reply[-1] and b" AUTH=" not in reply[-1]  # those came before
    return client


@pytest.mark.parametrize("port", ["imap", "imaps"])
def test_compress_deflate_both_ways_and_a_second_is_refused(
    srv: PostofficeServer, port: str
) -> None:
    client = logged_in(srv, port)
    try:
        assert client.cmd("A", b"COMPRESS DEFLATE") == [b"A OK DEFLATE active\r\n"]
        client.compress()
        caps = client.cmd("B", b"CAPABILITY")
        assert caps[-1] == b"B OK CAPABILITY completed\r\n", caps
        assert b"COMPRESS=" not in caps[0]  # RFC 4978 §3: not offered once active
        assert client.cmd("C", b"COMPRESS DEFLATE") == [
            b"C NO [COMPRESSIONACTIVE] DEFLATE is already active\r\n"
        ]
        assert client.cmd("D", b"SELECT INBOX")[-1].startswith(b"D OK [READ-WRITE]")
        assert client.cmd("E", b"LOGOUT")[-2:] == [
            b"* BYE Logging out\r\n",
            b"E OK LOGOUT completed\r\n",
        ]
        assert client.compressed_in > 0
    finally:
        client.close()
    assert wait_for(
        lambda: re.search(r"user=alice@example.test .*end=logout compress=deflate", srv.log())
    )


def test_an_unknown_mechanism_is_bad_and_the_session_stays_plain(srv: PostofficeServer) -> None:
    client = logged_in(srv, "imap")
    try:
        assert client.cmd("A", b"COMPRESS LZW") == [b"A BAD Unknown compression mechanism\r\n"]
        assert client.cmd("B", b"NOOP") == [b"B OK NOOP completed\r\n"]
    finally:
        client.close()


@pytest.mark.parametrize("port", ["imap", "imaps"])
def test_a_command_in_the_same_packet_as_compress_is_inflated(
    srv: PostofficeServer, port: str
) -> None:
    # RFC 4978 §3 has the client wait for the OK; one that does not must
    # still have its compressed bytes read as such, not lost or parsed plain.
    client = logged_in(srv, port)
    try:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        noop = deflater.compress(b"B NOOP\r\n") + deflater.flush(zlib.Z_SYNC_FLUSH)
        client.sock.sendall(b"A COMPRESS DEFLATE\r\n" + noop)
        assert client.line() == b"A OK DEFLATE active\r\n"
        client.compress()
        client.deflater = deflater  # the stream NOOP began
        assert client.until("B") == [b"B OK NOOP completed\r\n"]
        assert client.cmd("C", b"NOOP") == [b"C OK NOOP completed\r\n"]
    finally:
        client.close()


def test_a_big_fetch_comes_back_compressed(srv: PostofficeServer) -> None:
    body = b"".join(b"line %06d of a compressible message body\r\n" % i for i in range(20000))
    message = b"From: bob@example.test\r\nSubject: big\r\n\r\n" + body
    appender = imaps(srv)
    appender.append("INBOX", None, None, message)
    appender.logout()
    client = logged_in(srv, "imaps")
    try:
        assert client.cmd("A", b"COMPRESS DEFLATE")[-1] == b"A OK DEFLATE active\r\n"
        client.compress()
        assert client.cmd("B", b"SELECT INBOX")[-1].startswith(b"B OK")
        client.send(b"C FETCH 1 BODY.PEEK[]\r\n")
        head = client.line()
        match = re.search(rb"\{(\d+)\}", head)
        assert match and int(match.group(1)) == len(message), head
        literal = b""
        while len(literal) < len(message):
            literal += client.line()
        assert literal[: len(message)] == message
        assert client.until("C")[-1] == b"C OK FETCH completed\r\n"
        # The body compresses well: far fewer octets came than were sent plain.
        assert client.compressed_in < len(message) // 4, client.compressed_in
    finally:
        client.close()
