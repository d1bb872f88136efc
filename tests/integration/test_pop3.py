"""POP3 and POP3S (RFC 1939, 2449, 2595, 3206, 5034) against the real server.

Python's poplib over real sockets for the ordinary conversation, and a raw
line client where the exact bytes matter (pipelining, injection, limits).
Messages are put into the Maildirs directly, the way delivery agents do, so
these tests depend on nothing but the POP3 side.
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import os
import poplib
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.server import PostofficeServer

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
BOB, BOB_PW = "bob@example.test", "bob-password-2"
_counter = itertools.count(1)


# --- helpers ------------------------------------------------------------------------


def deliver(srv: PostofficeServer, address: str, data: bytes, *, dovecot: bool = True) -> str:
    """Put ``data`` (LF endings) into the Maildir the Maildir way: write to
    tmp/, rename into new/.  Dovecot-style names carry S= and W=; plain ones
    (as procmail or maildrop make) do not.  Returns the unique base name."""
    md = srv.maildir(address)
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    base = f"{int(time.time())}.M{next(_counter)}P{os.getpid()}.testhost"
    name = base
    if dovecot:
        crlf_size = len(data) + data.count(b"\n")
        name += f",S={len(data)},W={crlf_size}"
    tmp = md / "tmp" / name
    tmp.write_bytes(data)
    os.rename(tmp, md / "new" / name)
    return base


def client_context(srv: PostofficeServer) -> ssl.SSLContext:
    # The server's own self-signed certificate, verified (SAN 127.0.0.1).
    return ssl.create_default_context(cafile=str(srv.data_dir / "tls" / "cert.pem"))


def plain(srv: PostofficeServer) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=15)


def stls(srv: PostofficeServer) -> poplib.POP3:
    client = plain(srv)
    client.stls(client_context(srv))
    return client


def pop3s(srv: PostofficeServer) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=client_context(srv), timeout=15)


def login(client: poplib.POP3, user: str = ALICE, password: str = ALICE_PW) -> bytes:
    client.user(user)
    return client.pass_(password)


def err(excinfo: pytest.ExceptionInfo[poplib.error_proto]) -> bytes:
    return bytes(excinfo.value.args[0])


def files(srv: PostofficeServer, address: str = ALICE) -> dict[str, list[str]]:
    md = srv.maildir(address)
    return {
        sub: sorted(os.listdir(md / sub)) if (md / sub).is_dir() else [] for sub in ("new", "cur")
    }


class Raw:
    """A POP3 line client that sends exactly the bytes it is given."""

    def __init__(self, srv: PostofficeServer, port: str = "pop3") -> None:
        self.srv = srv
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", srv.ports[port]), 15)
        if port == "pop3s":
            self.sock = client_context(srv).wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buf = b""
        assert self.line().startswith(b"+OK")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def multiline(self) -> list[bytes]:
        lines: list[bytes] = []
        for _ in range(1_000_000):
            line = self.line()
            if line == b".":
                return lines
            lines.append(line)
        raise AssertionError("unterminated multi-line reply")

    def cmd(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def closed(self, timeout: float = 10.0) -> bool:
        """True if the server closes the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            for _ in range(1000):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return False

    def upgrade(self) -> None:
        self.sock = client_context(self.srv).wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()


def start_server(root: Path, **kwargs: object) -> PostofficeServer:
    srv = PostofficeServer(root, **kwargs)  # type: ignore[arg-type]
    srv.add_user(ALICE, ALICE_PW)
    srv.add_user(BOB, BOB_PW)
    srv.start()
    return srv


def lock_is_free(maildir: Path) -> bool:
    lock = maildir / "postoffice-pop3.lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    srv = start_server(tmp_path_factory.mktemp("pop3"))
    yield srv
    srv.stop()


@pytest.fixture
def server(shared_server: PostofficeServer) -> PostofficeServer:
    """One server for the module (starting one per test costs seconds), with
    empty mailboxes for each test.  Tests that fail logins use ``fresh``: the
    per-address throttle must not slow the tests after them."""
    for address in (ALICE, BOB):
        md = shared_server.maildir(address)
        assert wait_for(lambda md=md: lock_is_free(md)), "a previous session kept the lock"
        for sub in ("new", "cur"):
            if (md / sub).is_dir():
                for name in os.listdir(md / sub):
                    os.unlink(md / sub / name)
    return shared_server


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[PostofficeServer]:
    srv = start_server(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def raw(server: PostofficeServer) -> Iterator[Raw]:
    client = Raw(server)
    yield client
    client.close()


@pytest.fixture
def raw_tls(server: PostofficeServer) -> Iterator[Raw]:
    client = Raw(server, "pop3s")
    yield client
    client.close()


# --- AUTHORIZATION, plaintext policy, STLS -------------------------------------------


def test_capa_before_and_after_stls(server: PostofficeServer) -> None:
    client = plain(server)
    try:
        assert client.getwelcome().startswith(b"+OK mail.example.test")
        before = client.capa()
        for cap in ("TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS"):
            assert cap in before
        assert before["IMPLEMENTATION"] == ["postoffice"]
        assert "SASL" not in before  # no invitation to send a password in clear
        client.stls(client_context(server))
        after = client.capa()
        assert "STLS" not in after
        assert after["SASL"] == ["PLAIN", "LOGIN"]
        assert "USER" in after
        login(client)
        in_transaction = client.capa()
        assert "USER" not in in_transaction and "TOP" in in_transaction
        client.quit()
    finally:
        client.close()


def test_pop3s_offers_sasl_and_no_stls(server: PostofficeServer) -> None:
    with closing(pop3s(server)) as client:
        caps = client.capa()
        assert "STLS" not in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
        assert b"Logged in" in login(client)
        client.quit()


@pytest.mark.abuse
def test_credentials_are_refused_before_stls(raw: Raw) -> None:
    assert raw.cmd("USER alice@example.test") == (
        b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS"
    )
    assert raw.cmd("PASS alice-password-1").startswith(b"-ERR")
    plain_resp = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + ALICE_PW.encode()).decode()
    assert raw.cmd(f"AUTH PLAIN {plain_resp}").startswith(b"-ERR [AUTH] Plaintext")
    assert raw.cmd("AUTH").startswith(b"-ERR [AUTH] Plaintext")
    assert raw.cmd("STAT").startswith(b"-ERR")


def test_stls_then_login_works_and_stls_twice_is_refused(raw: Raw) -> None:
    assert raw.cmd("STLS").startswith(b"+OK")
    raw.upgrade()
    assert raw.cmd("STLS").startswith(b"-ERR")
    assert raw.cmd("USER alice@example.test").startswith(b"+OK")
    assert raw.cmd("PASS alice-password-1").startswith(b"+OK")
    assert raw.cmd("STLS").startswith(b"-ERR")
    assert raw.cmd("QUIT").startswith(b"+OK")


@pytest.mark.abuse
def test_stls_with_pipelined_plaintext_is_refused_and_closed(raw: Raw) -> None:
    # RFC 2595 §4 / CVE-2011-0411: nothing sent with STLS may be executed.
    raw.send(b"STLS\r\nUSER alice@example.test\r\n")
    assert raw.line().startswith(b"-ERR")
    assert raw.closed()
    assert b"+OK" not in raw.buf


@pytest.mark.abuse
def test_plaintext_arriving_during_the_handshake_is_discarded(server: PostofficeServer) -> None:
    raw = Raw(server)
    try:
        assert raw.cmd("STLS").startswith(b"+OK")
        raw.send(b"CAPA\r\n")  # plaintext after +OK, before the ClientHello
        try:
            raw.upgrade()
            first = raw.cmd("NOOP")
        except (ssl.SSLError, ConnectionError, OSError):
            pass  # the plaintext broke the handshake: never executed either
        else:
            # Discarded before the handshake: the first reply over TLS is the
            # NOOP's (not valid before login), not a capability list.
            assert first.startswith(b"-ERR NOOP is not valid")
    finally:
        raw.close()
    # The server is still fine.
    with closing(pop3s(server)) as client:
        login(client)
        client.quit()


def test_plaintext_login_on_loopback_when_the_config_allows_it(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"auth": {"allow_plaintext_loopback": True}})
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    try:
        deliver(srv, ALICE, b"Subject: x\n\nhi\n")
        client = plain(srv)
        assert client.capa()["SASL"] == ["PLAIN", "LOGIN"]
        assert b"1 messages" in login(client)
        client.quit()
    finally:
        srv.stop()


@pytest.mark.abuse
def test_wrong_password_unknown_user_and_bad_names_get_auth_code(fresh: PostofficeServer) -> None:
    with closing(pop3s(fresh)) as client:
        for user, password in ((ALICE, "wrong"), ("nobody@example.test", "x")):
            client.user(user)
            with pytest.raises(poplib.error_proto) as excinfo:
                client.pass_(password)
            assert err(excinfo).startswith(b"-ERR [AUTH]")
    with closing(pop3s(fresh)) as client:
        client.user("not-an-address")
        with pytest.raises(poplib.error_proto) as excinfo:
            client.pass_("x")
        assert err(excinfo).startswith(b"-ERR [AUTH]")
    assert "auth failed protocol=pop3 client=127.0.0.1 user=alice@example.test" in fresh.log()
    assert "auth failed protocol=pop3 client=127.0.0.1 user=-" in fresh.log()


@pytest.mark.abuse
def test_three_failed_logins_close_the_connection(fresh: PostofficeServer) -> None:
    with closing(Raw(fresh, "pop3s")) as raw_tls:
        for attempt in range(3):
            assert raw_tls.cmd("USER alice@example.test").startswith(b"+OK")
            reply = raw_tls.cmd(f"PASS wrong-{attempt}")
            assert reply.startswith(b"-ERR [AUTH]")
        assert raw_tls.closed()


@pytest.mark.abuse
def test_a_failed_login_then_the_right_password_works(fresh: PostofficeServer) -> None:
    with closing(pop3s(fresh)) as client:
        client.user(ALICE)
        with pytest.raises(poplib.error_proto):
            client.pass_("wrong")
        assert b"Logged in" in login(client)
        client.quit()


def test_user_names_are_case_insensitive(server: PostofficeServer) -> None:
    with closing(pop3s(server)) as client:
        assert b"Logged in" in login(client, "Alice@Example.TEST")
        client.quit()


def test_pass_keeps_spaces_in_passwords(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user("carol@example.test", " two words ")
    srv.start()
    try:
        with closing(pop3s(srv)) as client:
            assert b"Logged in" in login(client, "carol@example.test", " two words ")
            client.quit()
    finally:
        srv.stop()


def test_apop_is_neither_offered_nor_accepted(server: PostofficeServer, raw_tls: Raw) -> None:
    with closing(pop3s(server)) as client:
        assert b"<" not in client.getwelcome()  # no APOP timestamp in the greeting
    assert raw_tls.cmd("APOP alice@example.test c4c9334bac560ecc979e58001b3e22fb").startswith(
        b"-ERR"
    )


# --- RFC 5034 SASL -----------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_auth_plain_with_initial_response(raw_tls: Raw) -> None:
    assert raw_tls.cmd("AUTH PLAIN " + b64(b"\0" + ALICE.encode() + b"\0" + ALICE_PW.encode()))
    assert raw_tls.cmd("STAT").startswith(b"+OK 0 0")


def test_auth_plain_with_continuation_and_authzid(raw_tls: Raw) -> None:
    assert raw_tls.cmd("AUTH PLAIN") == b"+ "
    reply = raw_tls.cmd(b64(ALICE.encode() + b"\0" + ALICE.encode() + b"\0" + ALICE_PW.encode()))
    assert reply.startswith(b"+OK")


def test_auth_plain_refuses_another_authzid_and_bad_base64(fresh: PostofficeServer) -> None:
    with closing(Raw(fresh, "pop3s")) as raw_tls:
        reply = raw_tls.cmd("AUTH PLAIN " + b64(BOB.encode() + b"\0" + ALICE.encode() + b"\0x"))
        assert reply.startswith(b"-ERR")
        assert raw_tls.cmd("AUTH PLAIN !!!notbase64").startswith(b"-ERR")
        reply = raw_tls.cmd("AUTH PLAIN " + b64(b"\0" + ALICE.encode() + b"\0wrong"))
        assert reply.startswith(b"-ERR [AUTH]")


def test_auth_cancel_and_unknown_mechanism(raw_tls: Raw) -> None:
    assert raw_tls.cmd("AUTH PLAIN") == b"+ "
    assert raw_tls.cmd("*").startswith(b"-ERR")
    assert raw_tls.cmd("AUTH CRAM-MD5").startswith(b"-ERR")
    assert raw_tls.cmd("AUTH").startswith(b"+OK")
    assert raw_tls.multiline() == [b"PLAIN", b"LOGIN"]


def test_auth_login(raw_tls: Raw) -> None:
    assert raw_tls.cmd("AUTH LOGIN") == b"+ " + b64(b"Username:").encode()
    assert raw_tls.cmd(b64(ALICE.encode())) == b"+ " + b64(b"Password:").encode()
    assert raw_tls.cmd(b64(ALICE_PW.encode())).startswith(b"+OK")


# --- TRANSACTION --------------------------------------------------------------------

DOTTED = b"From: someone@remote.test\nSubject: dots\n\n.leading dot\n..two dots\n.\nend of body\n"


def test_full_session_sizes_dot_stuffing_uidl_top(server: PostofficeServer) -> None:
    bodies = [DOTTED, b"Subject: second\n\nline\n" * 3, b"Subject: third\n\n" + b"x" * 1500 + b"\n"]
    uids = [deliver(server, ALICE, bodies[0]), deliver(server, ALICE, bodies[1], dovecot=False)]
    uids.append(deliver(server, ALICE, bodies[2]))
    crlf = [b.replace(b"\n", b"\r\n") for b in bodies]
    client = stls(server)
    try:
        assert login(client) == f"+OK Logged in, 3 messages ({sum(map(len, crlf))} octets)".encode()
        assert client.stat() == (3, sum(map(len, crlf)))
        _, listing, _ = client.list()
        assert listing == [f"{i} {len(c)}".encode() for i, c in enumerate(crlf, 1)]
        assert client.list(2) == f"+OK 2 {len(crlf[1])}".encode()
        _, uidl, _ = client.uidl()
        assert uidl == [f"{i} {u}".encode() for i, u in enumerate(uids, 1)]
        assert client.uidl(3) == f"+OK 3 {uids[2]}".encode()
        for number, expected in enumerate(crlf, 1):
            resp, lines, _ = client.retr(number)
            assert resp == f"+OK {len(expected)} octets".encode()
            # poplib un-stuffs dots; the lines must be the message exactly.
            assert b"\r\n".join(lines) + b"\r\n" == expected
        _, top, _ = client.top(1, 2)
        assert top == [
            b"From: someone@remote.test",
            b"Subject: dots",
            b"",
            b".leading dot",
            b"..two dots",
        ]
        _, top, _ = client.top(1, 0)
        assert top == [b"From: someone@remote.test", b"Subject: dots", b""]
        assert client.noop().startswith(b"+OK")
        client.quit()
    finally:
        client.close()


def test_dot_stuffing_on_the_wire(raw_tls: Raw, server: PostofficeServer) -> None:
    deliver(server, ALICE, DOTTED)
    raw_tls.cmd("USER alice@example.test")
    assert raw_tls.cmd("PASS alice-password-1").startswith(b"+OK")
    size = len(DOTTED.replace(b"\n", b"\r\n"))
    assert raw_tls.cmd("RETR 1") == f"+OK {size} octets".encode()
    body = raw_tls.multiline()
    assert body[3:6] == [b"..leading dot", b"...two dots", b".."]
    unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in body)
    assert unstuffed == DOTTED.replace(b"\n", b"\r\n")


def test_list_size_equals_octets_received_for_a_crlf_file(server: PostofficeServer) -> None:
    data = b"Subject: crlf\r\n\r\nstored with CRLF by another agent\r\n.dot\r\n"
    deliver(server, ALICE, data, dovecot=False)
    with closing(pop3s(server)) as client:
        login(client)
        assert client.list()[1] == [f"1 {len(data)}".encode()]
        _, lines, _ = client.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == data
        client.quit()


def test_a_large_message_streams_exactly(server: PostofficeServer) -> None:
    line = b".0123456789" * 9 + b"\n"
    data = b"Subject: big\n\n" + line * 40_000  # ~4 MB, many chunk boundaries
    deliver(server, ALICE, data, dovecot=False)
    with closing(pop3s(server)) as client:
        login(client)
        expected = data.replace(b"\n", b"\r\n")
        assert client.stat() == (1, len(expected))
        _, lines, _ = client.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == expected
        _, top, _ = client.top(1, 3)
        assert top == [b"Subject: big", b"", line[:-1], line[:-1], line[:-1]]
        client.quit()


def test_bad_message_numbers(raw_tls: Raw, server: PostofficeServer) -> None:
    deliver(server, ALICE, b"Subject: x\n\n1\n")
    raw_tls.cmd("USER alice@example.test")
    raw_tls.cmd("PASS alice-password-1")
    for cmd in ("RETR 0", "RETR 2", "LIST 9", "UIDL 2", "TOP 2 1", "DELE 5"):
        assert raw_tls.cmd(cmd).startswith(b"-ERR No such message"), cmd
    for cmd in ("RETR", "RETR x", "TOP 1", "LIST 1 2", "STAT now"):
        assert raw_tls.cmd(cmd).startswith(b"-ERR"), cmd
    assert raw_tls.cmd("DELE 1").startswith(b"+OK")
    assert raw_tls.cmd("DELE 1") == b"-ERR Message 1 already deleted"
    assert raw_tls.cmd("RETR 1") == b"-ERR Message 1 already deleted"
    assert raw_tls.cmd("LIST").startswith(b"+OK 0 messages")
    assert raw_tls.multiline() == []
    assert raw_tls.cmd("STAT") == b"+OK 0 0"


def test_pipelined_commands_are_answered_in_order(raw_tls: Raw, server: PostofficeServer) -> None:
    for i in range(5):
        deliver(server, ALICE, f"Subject: {i}\n\nbody {i}\n".encode())
    raw_tls.cmd("USER alice@example.test")
    raw_tls.cmd("PASS alice-password-1")
    raw_tls.send(
        b"STAT\r\n" + b"".join(f"RETR {i}\r\n".encode() for i in range(1, 6)) + b"NOOP\r\n"
    )
    assert raw_tls.line().startswith(b"+OK 5 ")
    for i in range(5):
        assert raw_tls.line().startswith(b"+OK")
        assert raw_tls.multiline()[-1] == f"body {i}".encode()
    assert raw_tls.line() == b"+OK"


def test_retr_in_any_order_with_deletions_between(server: PostofficeServer) -> None:
    bodies = [b"Subject: %d\n\n" % i + b"line\n" * (i * 37 % 11) + b"#%d\n" % i for i in range(20)]
    for i, body in enumerate(bodies):
        deliver(server, ALICE, body, dovecot=bool(i % 3))
    order = [1, 2, 5, 3, 20, 19, 4, 6, 7, 8, 12, 11, 13]
    with closing(pop3s(server)) as client:
        login(client)
        client.dele(9)
        for number in order:
            if number == 6:
                client.dele(7)
            if number == 7:
                with pytest.raises(poplib.error_proto):
                    client.retr(7)
                continue
            _, lines, _ = client.retr(number)
            assert b"\r\n".join(lines) + b"\r\n" == bodies[number - 1].replace(b"\n", b"\r\n")
        client.quit()


def test_many_small_messages_in_order_pipelined_and_backwards(server: PostofficeServer) -> None:
    """Several read-ahead windows (read and encoded in the background) serve
    exactly the stored messages, whatever order the client asks in."""
    bodies = [
        b"Subject: %d\n\n" % i + (b".dot line\n" if i % 7 == 0 else b"") + b"x" * (i % 50) + b"\n"
        for i in range(300)
    ]
    for i, body in enumerate(bodies):
        deliver(server, ALICE, body, dovecot=bool(i % 2))

    def wire(i: int) -> bytes:
        return bodies[i - 1].replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")

    client = socket.create_connection(("127.0.0.1", server.ports["pop3s"]), timeout=15)
    ctx = client_context(server)
    with ctx.wrap_socket(client, server_hostname="127.0.0.1") as sock, sock.makefile("rb") as rf:
        assert rf.readline().startswith(b"+OK")
        sock.sendall(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n".encode())
        assert rf.readline().startswith(b"+OK") and rf.readline().startswith(b"+OK")

        def retr_reply() -> bytes:
            assert rf.readline().startswith(b"+OK")
            out = b""
            for _ in range(1000):
                line = rf.readline()
                if line == b".\r\n":
                    return out
                out += line
            raise AssertionError("no end of message")

        for n in range(1, 151):  # one command at a time, in order
            sock.sendall(b"RETR %d\r\n" % n)
            assert retr_reply() == wire(n)
        sock.sendall(b"".join(b"RETR %d\r\n" % n for n in range(151, 301)))  # pipelined
        for n in range(151, 301):
            assert retr_reply() == wire(n)
        for n in range(300, 0, -37):  # backwards: every one a miss
            sock.sendall(b"RETR %d\r\n" % n)
            assert retr_reply() == wire(n)
        sock.sendall(b"QUIT\r\n")
        assert rf.readline().startswith(b"+OK")


# --- UPDATE and its absence (RFC 1939 §6) -----------------------------------------------


def test_dele_then_quit_deletes_and_retr_marks_seen(server: PostofficeServer) -> None:
    keep = deliver(server, ALICE, b"Subject: keep\n\n1\n")
    read = deliver(server, ALICE, b"Subject: read\n\n2\n", dovecot=False)
    gone = deliver(server, ALICE, b"Subject: gone\n\n3\n")
    with closing(pop3s(server)) as client:
        login(client)
        client.retr(2)
        client.dele(3)
        assert client.quit() == b"+OK Logging out, 1 messages deleted"
    state = files(server)
    assert [n for n in state["new"] if n.startswith(keep)]
    assert state["cur"] == [f"{read}:2,S"]  # moved to cur/ with the seen flag
    assert not any(gone in n for n in state["new"] + state["cur"])


def test_a_message_removed_meanwhile_is_not_reported_deleted(fresh: PostofficeServer) -> None:
    """`user remove` while the user's session is open: RETR says the message
    is gone, so DELE of it is -ERR, and what UPDATE did not delete is never
    counted as deleted (QUIT's text, the log's deleted=)."""
    deliver(fresh, ALICE, b"Subject: one\n\n1\n")
    deliver(fresh, ALICE, b"Subject: two\n\n2\n")
    with closing(pop3s(fresh)) as client:
        login(client)
        fresh.cli("user", "remove", ALICE, "--force")
        with pytest.raises(poplib.error_proto) as retr:
            client.retr(1)
        assert err(retr) == b"-ERR Message was removed by another client"
        with pytest.raises(poplib.error_proto) as dele:
            client.dele(1)
        assert err(dele) == b"-ERR Message was removed by another client"
        assert client.dele(2).startswith(b"+OK")  # not known to be gone yet
        assert client.quit() == b"+OK Logging out, 0 messages deleted"
    assert wait_for(lambda: "retrieved=0 deleted=0 seen=0 end=quit" in fresh.log())
    removed = list((fresh.data_dir / "removed").rglob("new/*"))
    assert len(removed) == 2  # moved aside whole, nothing deleted from it


def test_dropped_connection_deletes_nothing(fresh: PostofficeServer) -> None:
    for i in range(3):
        deliver(fresh, ALICE, f"Subject: {i}\n\n{i}\n".encode())
    client = pop3s(fresh)
    login(client)
    for i in (1, 2, 3):
        client.dele(i)
    client.close()  # no QUIT
    assert wait_for(
        lambda: (
            "pop3 session client=127.0.0.1 user=alice@example.test tls=implicit"
            " retrieved=0 deleted=0 seen=0 end=dropped" in fresh.log()
        )
    )
    assert len(files(fresh)["new"]) == 3
    # And the lock went with the connection.
    with closing(pop3s(fresh)) as client2:
        assert b"3 messages" in login(client2)
        client2.quit()


def test_rset_undoes_dele(server: PostofficeServer) -> None:
    deliver(server, ALICE, b"Subject: x\n\n1\n")
    with closing(pop3s(server)) as client:
        login(client)
        client.dele(1)
        assert client.stat()[0] == 0
        assert client.rset().startswith(b"+OK Maildrop has 1 messages")
        assert client.stat()[0] == 1
        assert client.quit() == b"+OK Logging out, 0 messages deleted"
    assert len(files(server)["new"]) == 1


def test_idle_timeout_closes_without_reply_or_update(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"pop3_timeout": 1.0}})
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    try:
        deliver(srv, ALICE, b"Subject: x\n\n1\n")
        raw = Raw(srv, "pop3s")
        raw.cmd("USER alice@example.test")
        raw.cmd("PASS alice-password-1")
        assert raw.cmd("DELE 1").startswith(b"+OK")
        assert raw.closed(timeout=15)
        assert raw.buf == b""  # RFC 1939 §3: no response on autologout
        raw.close()
        assert len(files(srv)["new"]) == 1
        assert wait_for(lambda: "end=timeout" in srv.log())
    finally:
        srv.stop()


def test_server_killed_mid_session_loses_nothing_and_keeps_no_lock(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    try:
        deliver(srv, ALICE, b"Subject: x\n\n1\n")
        client = pop3s(srv)
        login(client)
        client.dele(1)
        srv.kill()
        client.close()
        srv.start()
        with closing(pop3s(srv)) as again:
            assert b"1 messages" in login(again)
            again.quit()
    finally:
        srv.stop()


# --- the lock, snapshots, UIDs ---------------------------------------------------------


def test_second_session_gets_in_use_until_the_first_quits(server: PostofficeServer) -> None:
    first = pop3s(server)
    login(first)
    with closing(pop3s(server)) as second:
        second.user(ALICE)
        with pytest.raises(poplib.error_proto) as excinfo:
            second.pass_(ALICE_PW)
        assert err(excinfo).startswith(b"-ERR [IN-USE]")
        # Another user's mailbox is not affected.
        assert b"Logged in" in login(second, BOB, BOB_PW)
        second.quit()
    first.quit()
    with closing(pop3s(server)) as third:
        assert b"Logged in" in login(third)
        third.quit()


def test_messages_delivered_during_a_session_wait_for_the_next(server: PostofficeServer) -> None:
    deliver(server, ALICE, b"Subject: 1\n\n1\n")
    with closing(pop3s(server)) as client:
        login(client)
        deliver(server, ALICE, b"Subject: 2\n\n2\n")
        assert client.stat()[0] == 1
        assert len(client.uidl()[1]) == 1
        client.dele(1)
        client.quit()
    with closing(pop3s(server)) as client:
        login(client)
        assert client.stat()[0] == 1
        _, lines, _ = client.retr(1)
        assert lines[-1] == b"2"
        client.quit()


def test_uidl_is_stable_across_sessions_restarts_and_deletions(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    try:
        for i in range(4):
            deliver(srv, ALICE, f"Subject: {i}\n\n{i}\n".encode(), dovecot=bool(i % 2))
        long_name = srv.maildir(ALICE) / "new" / ("1700000000." + "z" * 90)
        long_name.write_bytes(b"Subject: long\n\nname\n")

        def uidl() -> dict[str, int]:
            with closing(pop3s(srv)) as client:
                login(client)
                mapping = {}
                for line in client.uidl()[1]:
                    number, uid = line.split()
                    mapping[uid.decode()] = int(number)
                client.retr(1)  # moves it to cur/ with a new name
                client.quit()
            return mapping

        first = uidl()
        assert len(first) == 5
        assert all(1 <= len(u) <= 70 for u in first)
        assert uidl().keys() == first.keys()
        srv.stop()
        srv.start()
        assert uidl().keys() == first.keys()
        with closing(pop3s(srv)) as client:
            login(client)
            client.dele(2)
            client.quit()
        after = uidl()
        assert set(after) < set(first) and len(after) == 4
        deliver(srv, ALICE, b"Subject: new\n\nnew\n")
        newest = uidl()
        (added,) = set(newest) - set(first)
        assert added not in first  # never reused
    finally:
        srv.stop()


def test_a_broken_maildir_is_a_permanent_system_error(server: PostofficeServer) -> None:
    md = server.maildir(BOB)
    md.parent.mkdir(parents=True, exist_ok=True)
    if md.exists():
        shutil.rmtree(md)
    md.write_bytes(b"not a directory")  # an administrator's mistake
    try:
        with closing(pop3s(server)) as client:
            client.user(BOB)
            with pytest.raises(poplib.error_proto) as excinfo:
                client.pass_(BOB_PW)
            assert err(excinfo).startswith(b"-ERR [SYS/PERM]")
    finally:
        md.unlink()


def test_an_unreadable_message_is_a_temporary_system_error(server: PostofficeServer) -> None:
    deliver(server, ALICE, b"Subject: 1\n\n1\n", dovecot=False)
    deliver(server, ALICE, b"Subject: 2\n\n2\n")
    with closing(pop3s(server)) as client:
        login(client)
        (first,) = [p for p in server.messages(ALICE) if "," not in p.name]
        first.unlink()
        first.mkdir()  # the name now opens as a directory: EISDIR on read
        try:
            with pytest.raises(poplib.error_proto) as excinfo:
                client.retr(1)
            assert err(excinfo).startswith(b"-ERR [SYS/TEMP]")
            assert client.retr(2)[1][-1] == b"2"  # the session goes on
            client.quit()
        finally:
            first.rmdir()


# --- limits ---------------------------------------------------------------------------


def test_too_many_bad_commands_close_the_session(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"max_errors": 3}})
    srv.start()
    try:
        raw = Raw(srv)
        assert raw.cmd("FOO").startswith(b"-ERR")
        assert raw.cmd("BAR").startswith(b"-ERR")
        assert raw.cmd("BAZ").startswith(b"-ERR")
        assert raw.closed()
        raw.close()
    finally:
        srv.stop()


def test_over_long_lines_are_refused(raw: Raw) -> None:
    raw.send(b"NOOP " + b"x" * 100_000 + b"\r\n")
    assert raw.line() == b"-ERR Line too long"
    assert raw.cmd("CAPA").startswith(b"+OK")


def test_connections_per_client_are_bounded(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"max_connections_per_ip": 2}})
    srv.start()
    try:
        first, second = Raw(srv), Raw(srv)
        sock = socket.create_connection(("127.0.0.1", srv.ports["pop3"]), 10)
        with sock:
            data = sock.recv(1000)
            assert data.startswith(b"-ERR [SYS/TEMP]")
        first.close()
        second.close()
    finally:
        srv.stop()


def test_one_log_line_per_session(fresh: PostofficeServer) -> None:
    deliver(fresh, ALICE, b"Subject: x\n\n1\n")
    with closing(pop3s(fresh)) as client:
        login(client)
        client.retr(1)
        client.dele(1)
        client.quit()
    assert wait_for(
        lambda: (
            "pop3 session client=127.0.0.1 user=alice@example.test tls=implicit "
            "retrieved=1 deleted=1" in fresh.log()
        )
    )


def test_sigterm_ends_an_open_session_at_once_without_update(fresh: PostofficeServer) -> None:
    deliver(fresh, ALICE, b"Subject: x\n\nbody\n")
    client = stls(fresh)
    login(client)
    client.dele(1)
    started = time.monotonic()
    assert fresh.stop() == 0
    # Not the 10 s grace period: a session waiting for a command ends at once.
    assert time.monotonic() - started < 8
    assert len(fresh.messages(ALICE)) == 1  # no QUIT, so no UPDATE
    client.close()
