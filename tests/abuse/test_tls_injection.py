"""STARTTLS and STLS command injection (CVE-2011-0411 and the 2021 family).

Whatever a client (or a man in the middle) sends in plaintext after
STARTTLS/STLS, in the same packet or while the handshake runs, must be
thrown away: not executed, and not answered inside the encrypted session
(RFC 3207 §4.2, RFC 2595 §4).  tests/integration covers an injected MAIL on
port 25 and the POP3 STLS cases; here: injected AUTH on submission (it
would log the attacker in as someone else), replies smuggled into the TLS
stream on both STARTTLS ports, and plaintext racing the handshake; and for POP3
STLS (RFC 2595 §4) pipelined credentials and the same race, so that
``pytest -m abuse`` covers both protocols.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.support.helpers import ALICE, ALICE_PW, plain_auth, raw, tls_context
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse


def replies_until_close(client: RawSmtp) -> list[int]:
    codes: list[int] = []
    for _ in range(20):
        try:
            codes.append(client.reply()[0])
        except (ConnectionError, OSError):
            break
    return codes


@pytest.mark.parametrize("port", ["smtp", "submission"])
def test_injected_commands_get_no_reply_inside_tls(server: PostofficeServer, port: str) -> None:
    client = raw(server, port)
    client.send(b"STARTTLS\r\nNOOP\r\nNOOP\r\nRSET\r\n")
    assert client.reply()[0] == 220
    client.starttls()
    # Our own commands inside TLS: exactly their replies, nothing queued before them.
    client.send(b"NOOP\r\nQUIT\r\n")
    assert replies_until_close(client) == [250, 221]


def test_injected_auth_on_submission_is_not_executed(server: PostofficeServer) -> None:
    client = raw(server, "submission")
    client.send(
        b"STARTTLS\r\nAUTH PLAIN "
        + plain_auth(ALICE, ALICE_PW).encode()
        + b"\r\nMAIL FROM:<alice@example.test>\r\n"
    )
    assert client.reply()[0] == 220
    client.starttls()
    assert client.cmd("EHLO client.test")[0] == 250
    code, _ = client.cmd("MAIL FROM:<alice@example.test>")
    assert code == 530  # not logged in: the plaintext AUTH was discarded
    client.cmd("QUIT")
    assert "auth ok" not in server.log()


def test_plaintext_racing_the_smtp_handshake_is_not_executed(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("STARTTLS")[0] == 220
    # The attacker's bytes arrive after the 220, where the ClientHello belongs.
    client.send(b"MAIL FROM:<racer@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    sock = client.sock
    assert isinstance(sock, socket.socket)
    try:
        tls = tls_context().wrap_socket(sock)
    except (ssl.SSLError, OSError):
        pass  # the server saw garbage instead of a ClientHello and hung up: fine
    else:
        # Had the handshake survived, the racing commands must still be gone.
        client.sock = tls
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd("RCPT TO:<alice@example.test>")[0] == 503
    assert "racer@remote.test" not in server.log()
    assert server.messages(ALICE) == []


def pop3_line(sock: socket.socket | ssl.SSLSocket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def test_pop3_credentials_pipelined_behind_stls_are_not_used(server: PostofficeServer) -> None:
    token = plain_auth(ALICE, ALICE_PW).encode()
    with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10) as sock:
        assert pop3_line(sock).startswith(b"+OK")
        sock.sendall(b"STLS\r\nAUTH PLAIN " + token + b"\r\nSTAT\r\n")
        answer = pop3_line(sock)
        if answer.startswith(b"+OK"):  # upgraded: the injected lines must be gone
            tls = tls_context().wrap_socket(sock)
            tls.sendall(b"STAT\r\n")
            assert pop3_line(tls).startswith(b"-ERR")  # not logged in
        else:
            assert answer.startswith(b"-ERR")  # refused, and the session ends
            assert pop3_line(sock) == b""
    assert "auth ok" not in server.log()


def test_pop3_plaintext_racing_the_handshake_is_not_executed(server: PostofficeServer) -> None:
    with socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10) as sock:
        assert pop3_line(sock).startswith(b"+OK")
        sock.sendall(b"STLS\r\n")
        assert pop3_line(sock).startswith(b"+OK")
        sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n".encode())
        try:
            tls = tls_context().wrap_socket(sock)
        except (ssl.SSLError, OSError):
            pass  # garbage instead of a ClientHello: the server hung up
        else:
            tls.sendall(b"STAT\r\n")
            assert pop3_line(tls).startswith(b"-ERR")
    assert "auth ok" not in server.log()
