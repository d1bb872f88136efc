"""STARTTLS and STLS command injection (CVE-2011-0411 and the 2021 family).

Whatever a client (or a man in the middle) sends in plaintext after
STARTTLS/STLS, in the same packet or while the handshake runs, must never
be executed, nor answered inside the encrypted session (RFC 3207 §4.2,
RFC 2595 §4).  Both protocols refuse a STARTTLS/STLS that has data behind
it (SMTP ``554 5.5.1``, POP3 ``-ERR``) and close at once, logged; plaintext
that races the handshake breaks it.  tests/integration covers an injected
MAIL on port 25 and the POP3 STLS cases; here: injected AUTH on submission
(it would log the attacker in as someone else), commands behind STARTTLS on
both STARTTLS ports, a ClientHello in the same write as STARTTLS (a client
that does not wait for the 220: answered at once, not left hanging), and
plaintext racing the handshake; and for POP3 STLS (RFC 2595 §4) pipelined
credentials and the same race, so that ``pytest -m abuse`` covers both
protocols.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import pytest

from tests.support.helpers import ALICE, ALICE_PW, plain_auth, raw, tls_context, wait_for
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
def test_injected_commands_are_refused_with_the_starttls(
    server: PostofficeServer, port: str
) -> None:
    client = raw(server, port)
    client.send(b"STARTTLS\r\nNOOP\r\nNOOP\r\nRSET\r\n")
    # One reply, the refusal; none of the injected commands is answered.
    code, lines = client.reply()
    assert (code, lines[0]) == (554, "5.5.1 Nothing may follow STARTTLS before the handshake")
    assert replies_until_close(client) == []


def test_injected_auth_on_submission_is_not_executed(server: PostofficeServer) -> None:
    client = raw(server, "submission")
    client.send(
        b"STARTTLS\r\nAUTH PLAIN "
        + plain_auth(ALICE, ALICE_PW).encode()
        + b"\r\nMAIL FROM:<alice@example.test>\r\n"
    )
    assert client.reply()[0] == 554
    assert replies_until_close(client) == []
    assert "auth ok" not in server.log()


def client_hello() -> bytes:
    """A real TLS ClientHello, as a client sends it to start a handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("port", ["smtp", "submission"])
def test_a_client_hello_in_the_starttls_write_is_answered_at_once(
    server: PostofficeServer, port: str
) -> None:
    """trial #2: a client that sends its ClientHello with STARTTLS, not
    waiting for the 220, used to get the 220 and then nothing for 30 s (the
    hello was discarded, the handshake waited for another).  Now: a clear
    refusal, the connection closed at once, and a log record."""
    client = raw(server, port)
    client.sock.settimeout(5)  # far below the 30 s handshake deadline
    started = time.monotonic()
    client.send(b"STARTTLS\r\n" + client_hello())
    code, lines = client.reply()
    assert (code, lines[0]) == (554, "5.5.1 Nothing may follow STARTTLS before the handshake")
    assert client.closed_by_peer()
    assert time.monotonic() - started < 5
    mode = "smtp" if port == "smtp" else "submission"
    assert wait_for(
        lambda: any(
            f"smtp session mode={mode} client=127.0.0.1" in line
            and 'end="data after STARTTLS" after=STARTTLS' in line
            for line in server.log().splitlines()
        )
    ), server.log()


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
