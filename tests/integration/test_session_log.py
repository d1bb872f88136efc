"""Every SMTP session ends with one log record, however it ended (trial #1, #6).

Postfix logs ``disconnect from host[addr] ehlo=1 mail=1 rcpt=0/1 data=0/1
commands=2/4`` and ``lost connection after DATA (N bytes)``; an admin who
only sees the accepted messages misses the clients that dropped mid-DATA,
failed their handshake or drew nothing but refusals.  Here each way a
session can end, over real sockets: the record's fields are read back with
the logfmt parser of the log-injection tests, so a client's HELO cannot add
fields to it either.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    make_server,
    plain_auth,
    raw,
    tls_context,
    wait_for,
)
from tests.support.logs import records
from tests.support.server import PostofficeServer


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = make_server(tmp_path_factory.mktemp("session-log"), limits={"max_errors": 5})
    yield server
    server.stop()


def session(srv: PostofficeServer, helo: str) -> dict[str, str]:
    """The one ``smtp session`` record of the session that greeted with ``helo``."""
    found: list[dict[str, str]] = []

    def one() -> bool:
        found[:] = [r for r in records(srv, "smtp session") if r.get("helo") == helo]
        return len(found) == 1

    assert wait_for(one), f"{found}\n{srv.log()}"
    return found[0]


def closed(sock: socket.socket) -> bool:
    """The server hung up (an EOF, or a reset: it closed with our bytes unread)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_a_quit_session(srv: PostofficeServer) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as client:
        client.ehlo("quit.test")
        client.sendmail("a@remote.test", [ALICE], b"Subject: x\r\n\r\nx\r\n")
    record = session(srv, "quit.test")
    assert record["mode"] == "smtp" and record["client"] == "127.0.0.1"
    assert record["tls"] == "no" and record["user"] == "-" and record["end"] == "quit"
    assert "after" not in record
    assert (record["ehlo"], record["mail"], record["rcpt"], record["data"]) == ("1", "1", "1", "1")
    assert record["quit"] == "1" and record["commands"] == "5"
    # The message's own record says tls= too (trial #6).
    (message,) = [r for r in records(srv, "received id=") if r.get("helo") == "quit.test"]
    assert message["tls"] == "no" and message["mode"] == "smtp"


def test_dropped_in_the_middle_of_data(srv: PostofficeServer) -> None:
    client = raw(srv, ehlo=False)
    assert client.cmd("EHLO mid-data.test")[0] == 250
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: cut\r\n\r\n" + b"x" * 1000 + b"\r\n")
    time.sleep(0.3)  # read by the server before the close
    client.close()
    record = session(srv, "mid-data.test")
    assert record["end"] == "dropped" and record["after"] == "DATA"
    # Content received so far (LF line ends; the last line end may still be
    # held back by the decoder, as it could begin the final dot).
    assert 1014 <= int(record["bytes"]) <= len(b"Subject: cut\n\n" + b"x" * 1000 + b"\n")
    assert record["data"] == "0/1" and record["commands"] == "3/4"


def test_refusals_only(srv: PostofficeServer) -> None:
    client = raw(srv, ehlo=False)
    assert client.cmd("EHLO refused.test")[0] == 250
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert client.cmd("RCPT TO:<nobody@example.test>")[0] == 550
    assert client.cmd("RCPT TO:<x@elsewhere.test>")[0] == 554
    assert client.cmd("DATA")[0] == 554
    assert client.cmd("BOGUS")[0] == 500
    assert client.cmd("QUIT")[0] == 221
    record = session(srv, "refused.test")
    assert record["end"] == "quit"
    assert (record["rcpt"], record["data"], record["unknown"]) == ("0/2", "0/1", "0/1")
    assert record["commands"] == "3/7"


def test_too_many_errors(srv: PostofficeServer) -> None:
    client = raw(srv, ehlo=False)
    assert client.cmd("EHLO errors.test")[0] == 250
    client.send(b"BOGUS\r\n" * 5)
    codes = [client.reply()[0] for _ in range(6)]
    assert codes == [500] * 5 + [421]
    record = session(srv, "errors.test")
    assert record["end"] == "too many errors" and record["unknown"] == "0/5"


def test_a_failed_starttls_handshake(srv: PostofficeServer) -> None:
    client = raw(srv, "submission", ehlo=False)
    assert client.cmd("EHLO tls-fail.test")[0] == 250
    assert client.cmd("STARTTLS")[0] == 220
    client.send(b"this is no ClientHello\r\n" * 4)
    assert client.closed_by_peer()
    record = session(srv, "tls-fail.test")
    assert record["mode"] == "submission" and record["end"] == "TLS handshake failed"
    assert record["after"] == "STARTTLS" and record["reason"]
    assert record["starttls"] == "0/1" and record["tls"] == "no"


def test_submissions_on_465_with_a_login(srv: PostofficeServer) -> None:
    client = raw(srv, "submissions", ehlo=False)
    assert client.cmd("EHLO implicit.test")[0] == 250
    assert client.cmd(f"AUTH PLAIN {plain_auth(ALICE, ALICE_PW)}")[0] == 235
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd("RCPT TO:<someone@remote.test>")[0] == 250
    assert client.cmd("RSET")[0] == 250
    client.close()
    record = session(srv, "implicit.test")
    assert record["mode"] == "submissions" and record["tls"] == "implicit"
    assert record["user"] == ALICE and record["end"] == "dropped"
    assert record["after"] == "RSET" and record["auth"] == "1"


def test_a_starttls_session_after_the_handshake(srv: PostofficeServer) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as client:
        client.ehlo("stls.test")
        client.starttls(context=tls_context())
        client.ehlo("stls.test")
        client.login(ALICE, ALICE_PW)
    record = session(srv, "stls.test")
    assert record["tls"] == "stls" and record["starttls"] == "1" and record["ehlo"] == "2"
    assert record["auth"] == "1" and record["end"] == "quit"


def test_a_helo_name_cannot_add_fields(srv: PostofficeServer) -> None:
    helo = 'x"end=quit'
    with socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(f"EHLO {helo}\r\n".encode())
        sock.recv(1024)
    record = session(srv, helo)  # records() fails on a field given twice
    assert record["end"] == "dropped"


def test_a_silent_client_times_out(tmp_path: Path) -> None:
    server = make_server(tmp_path, limits={"smtp_timeout": 1})
    try:
        client = raw(server, ehlo=False)
        assert client.cmd("EHLO slow.test")[0] == 250
        assert client.reply()[0] == 421
        record = session(server, "slow.test")
        assert record["end"] == "timeout" and record["after"] == "EHLO"
    finally:
        server.stop()


def test_a_failed_implicit_tls_handshake_on_465(srv: PostofficeServer) -> None:
    """No session begins, so the listener writes the record."""
    with socket.create_connection(("127.0.0.1", srv.ports["submissions"]), timeout=10) as sock:
        sock.sendall(b"EHLO no-tls.test\r\n")
        assert closed(sock)  # garbage instead of a ClientHello
    assert wait_for(
        lambda: any(
            r["client"] == "127.0.0.1" and r["end"] == "TLS handshake failed" and r["reason"]
            for r in records(srv, "submissions session")
        )
    ), srv.log()


def test_pop3_records_quote_an_end_of_several_words(srv: PostofficeServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.ports["pop3"]), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"STLS\r\n")
        assert sock.recv(1024).startswith(b"+OK")
        sock.sendall(b"this is no ClientHello\r\n" * 4)
        assert closed(sock)
    assert wait_for(
        lambda: any(r["end"] == "TLS handshake failed" for r in records(srv, "pop3 session"))
    ), srv.log()
