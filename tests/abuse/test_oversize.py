"""Too much of everything: command lines, text lines, messages, recipients, connections.

Each limit must hold without the server buffering what it refuses: the
server's resident memory is read from /proc before and after, and may grow
by far less than what was sent.  tests/integration covers each limit at its
edge (a 600-octet command, a 1,200-octet line, a small size limit, two
recipients, two connections); here the same limits are hit hard.
"""

from __future__ import annotations

import base64
import poplib
import socket
from collections.abc import Iterator

import pytest

from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    make_server,
    raw,
    rss_kib,
    tls_context,
)
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse

MiB = 1024 * 1024
LIMIT = 1 * MiB  # this module's max_message_size
FLOOD = 10 * MiB
# What the server may grow by while refusing FLOOD: bounded, not proportional.
GROWTH_KIB = 8 * 1024


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    srv = make_server(tmp_path_factory.mktemp("oversize"), limits={"max_message_size": LIMIT})
    yield srv
    srv.stop()


def pid(srv: PostofficeServer) -> int:
    assert srv.proc is not None
    return srv.proc.pid


def send_flood(client: RawSmtp, chunk: bytes, total: int) -> None:
    for _ in range(total // len(chunk)):
        client.send(chunk)


def reply_codes_until(client: RawSmtp, wanted: int, limit: int = 50) -> list[int]:
    codes = []
    for _ in range(limit):
        codes.append(client.reply()[0])
        if codes[-1] == wanted:
            break
    return codes


def tmp_files(srv: PostofficeServer) -> list[str]:
    return [p.name for p in (srv.data_dir / "mail").glob("*/*/tmp/*")]


def test_endless_command_line(server: PostofficeServer) -> None:
    before = rss_kib(pid(server))
    client = raw(server)
    send_flood(client, b"A" * 65536, FLOOD)
    client.send(b"\r\nNOOP\r\n")
    codes = reply_codes_until(client, 250)
    assert codes[0] == 500 and codes[-1] == 250, codes  # refused once, then the session goes on
    assert rss_kib(pid(server)) - before < GROWTH_KIB


def test_endless_pop3_line(server: PostofficeServer) -> None:
    before = rss_kib(pid(server))
    sock = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=20)
    try:
        assert sock.recv(1024).startswith(b"+OK")
        for _ in range(FLOOD // 65536):
            sock.sendall(b"B" * 65536)
        sock.sendall(b"\r\nCAPA\r\n")
        answer = b""
        while b"\r\n.\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        # One refusal for the whole line, then the session goes on.
        assert answer.startswith(b"-ERR Line too long\r\n+OK"), answer[:100]
    finally:
        sock.close()
    assert rss_kib(pid(server)) - before < GROWTH_KIB


def test_endless_text_line_in_data(server: PostofficeServer) -> None:
    before = rss_kib(pid(server))
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd(f"RCPT TO:<{ALICE}>")
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: one line\r\n\r\n")
    send_flood(client, b"y" * 65536, FLOOD)
    client.send(b"\r\n.\r\n")
    code, lines = client.reply()
    assert code in (552, 554), (code, lines)  # too big, or a line over 998 octets
    assert client.cmd("NOOP")[0] == 250
    assert server.messages(ALICE) == [] and tmp_files(server) == []
    assert rss_kib(pid(server)) - before < GROWTH_KIB


def test_message_far_over_the_size_limit(server: PostofficeServer) -> None:
    before = rss_kib(pid(server))
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")  # no SIZE= declared: found out while reading
    client.cmd(f"RCPT TO:<{ALICE}>")
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: huge\r\n\r\n")
    send_flood(client, (b"z" * 78 + b"\r\n") * 800, FLOOD)
    client.send(b".\r\n")
    code, lines = client.reply()
    assert code == 552 and lines[0].startswith("5.3.4"), (code, lines)
    assert server.messages(ALICE) == [] and tmp_files(server) == []
    assert rss_kib(pid(server)) - before < GROWTH_KIB
    # The session goes on, and a message that fits is taken.
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd(f"RCPT TO:<{ALICE}>")
    assert client.cmd("DATA")[0] == 354
    assert client.cmd("Subject: small\r\n\r\nok\r\n.")[0] == 250
    assert len(server.messages(ALICE)) == 1


def test_a_huge_header_block_within_the_size_limit(server: PostofficeServer) -> None:
    # Over 256 KiB of header section is refused (552 5.3.4, like Postfix's
    # header_size_limit): nothing past that is parsed, so a From: hidden there
    # could not be checked.  Just under it is accepted whole.
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd(f"RCPT TO:<{ALICE}>")
    assert client.cmd("DATA")[0] == 354
    headers = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"h" * 60) for i in range(12_000))
    client.send(headers + b"\r\nbody\r\n.\r\n")
    code, lines = client.reply()
    assert code == 552 and lines[0].startswith("5.3.4")
    assert server.messages(ALICE) == []
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd(f"RCPT TO:<{ALICE}>")
    assert client.cmd("DATA")[0] == 354
    headers = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"h" * 60) for i in range(3_000))  # ~230 KiB
    client.send(headers + b"\r\nbody\r\n.\r\n")
    assert client.reply()[0] == 250
    (path,) = server.messages(ALICE)
    assert path.read_bytes().endswith(b"\n\nbody\n")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_oversized_sasl_responses(server: PostofficeServer, mechanism: str) -> None:
    client = raw(server, "submissions")
    huge = base64.b64encode(b"\0" + b"u" * 200_000 + b"\0pw").decode()
    assert client.cmd(f"AUTH {mechanism}")[0] == 334
    code, _ = client.cmd(huge)
    assert code in (500, 501, 535)
    client.send(b"NOOP\r\n")
    assert reply_codes_until(client, 250)[-1] == 250
    # and a real login still works on the same connection
    plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    assert client.cmd(f"AUTH PLAIN {plain}")[0] == 235


def test_recipients_past_the_default_limit(server: PostofficeServer) -> None:
    client = raw(server)
    client.send(b"MAIL FROM:<a@remote.test>\r\n")
    client.send(b"".join(b"RCPT TO:<alice+%d@example.test>\r\n" % i for i in range(150)))
    client.send(b"DATA\r\n")
    codes = [client.reply() for _ in range(152)]
    assert codes[0][0] == 250
    rcpts = [c for c, _ in codes[1:151]]
    assert rcpts == [250] * 100 + [452] * 50  # RFC 5321 §4.5.3.1.8: at least 100
    assert all(lines[0].startswith("4.5.3") for c, lines in codes[101:151])
    assert codes[151][0] == 354
    assert client.cmd("Subject: many\r\n\r\nx\r\n.")[0] == 250
    assert len(server.messages(ALICE)) == 1  # 100 names of one mailbox: one copy
    # The count is per transaction.
    client.cmd("MAIL FROM:<a@remote.test>")
    assert client.cmd("RCPT TO:<alice+again@example.test>")[0] == 250


CLOSED = b"(closed before the handshake)"


@pytest.mark.parametrize("port", ["smtp", "submissions", "pop3"])
def test_connection_flood_from_one_address(server: PostofficeServer, port: str) -> None:
    per_ip = 20  # the default max_connections_per_ip
    greeted, refused = [], []
    socks = []
    # On an implicit-TLS port a connection over the cap is closed at accept,
    # before any handshake (the busy line could only go out in plaintext).
    busy = (CLOSED,) if port == "submissions" else (b"421", b"-ERR")
    try:
        for _ in range(per_ip + 30):
            sock = socket.create_connection(("127.0.0.1", server.ports[port]), timeout=10)
            socks.append(sock)
            if port == "submissions":
                try:
                    sock = tls_context().wrap_socket(sock)
                except OSError:  # ssl.SSLError is one
                    refused.append(CLOSED)
                    continue
                socks.append(sock)
            first = sock.recv(1024)
            (greeted if first[:3] in (b"220", b"+OK") else refused).append(first)
        assert len(greeted) == per_ip, (len(greeted), refused[:1])
        assert all(r.startswith(busy) for r in refused), refused[:3]
        # Another client address is not affected.
        other = socket.create_connection(
            ("127.0.0.1", server.ports[port]), timeout=10, source_address=("127.0.0.2", 0)
        )
        socks.append(other)
        if port == "submissions":
            other = tls_context().wrap_socket(other)
            socks.append(other)
        assert other.recv(1024)[:3] in (b"220", b"+OK")
    finally:
        for sock in socks:
            sock.close()
    # The slots come back once the flood is gone.
    for _ in range(100):
        probe = socket.create_connection(("127.0.0.1", server.ports[port]), timeout=10)
        try:
            if port == "submissions":
                probe = tls_context().wrap_socket(probe)
            first = probe.recv(1024)
        except OSError:
            first = CLOSED
        finally:
            probe.close()
        if first[:3] in (b"220", b"+OK"):
            break
    else:
        raise AssertionError("slots never freed")


def test_total_connection_cap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(tmp_path, limits={"max_connections": 10, "max_connections_per_ip": 5})
    socks = []
    try:
        answers = []
        for i in range(14):
            source = f"127.0.0.{10 + i // 4}"  # 4 per address, under the per-address cap
            sock = socket.create_connection(
                ("127.0.0.1", srv.ports["smtp"]), timeout=10, source_address=(source, 0)
            )
            socks.append(sock)
            answers.append(sock.recv(1024)[:3])
        assert answers == [b"220"] * 10 + [b"421"] * 4
        pop = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=10)  # its own cap
        assert pop.getwelcome().startswith(b"+OK")
        pop.close()
    finally:
        for sock in socks:
            sock.close()
        srv.stop()
