"""IMAP under abuse (issue #13): what a hostile or broken client may try on 143 and 993.

Every test talks to the real server over real sockets, as raw bytes, and
asserts the exact answer: the limits of the sans-I/O core
(``protocol/imap.py``: line, literal, nesting, ranges) and of the session
(``net/imap_session.py``: timeouts, login failures), the shared listener
caps and login throttle, and mailbox names (``storage/folder_names.py``).

The plaintext port is used with ``[auth] allow_plaintext_loopback`` so the
transcripts stay readable; 993 is used where TLS is the point (caps).
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import ssl
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from postoffice.net.pop3_session import MAX_AUTH_FAILURES  # IMAP must match it
from tests.abuse.test_connection_hogs import (
    closed_by_server,
    pipeline_without_reading,
    settled_socket_fds,
    socket_fds,
)
from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    make_server,
    rss_kib,
    tls_context,
    wait_for,
)
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.abuse

MiB = 1024 * 1024
LIMIT = 1 * MiB  # [limits] max_message_size here: APPENDLIMIT
FLOOD = 10 * MiB
GROWTH_KIB = 8 * 1024  # what refusing FLOOD may cost the server: bounded, not proportional
TIMEOUT = 3.0  # [limits] imap_timeout here: autologout and the write timeout
PER_IP = 5
HOGS = "127.0.0.2"


class RawImap:
    """A line-level IMAP client: commands as bytes, the server's lines back."""

    def __init__(
        self,
        srv: PostofficeServer,
        port: str = "imap",
        source: str = "127.0.0.1",
        timeout: float = 15,
    ) -> None:
        sock = socket.create_connection(
            ("127.0.0.1", srv.ports[port]), timeout=timeout, source_address=(source, 0)
        )
        if port == "imaps":
            sock = tls_context().wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.line()

    def line(self) -> bytes:
        return self.file.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, tag: str, command: bytes) -> list[bytes]:
        """Send ``tag command`` and read up to its tagged answer (all lines)."""
        self.send(tag.encode() + b" " + command + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(tag.encode() + b" "):
                return lines

    def login(self, user: str = ALICE, password: str = ALICE_PW) -> None:
        reply = self.cmd("L", f'LOGIN "{user}" "{password}"'.encode())
        assert reply[-1].startswith(b"L OK [CAPABILITY "), reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    srv = make_server(
        tmp_path_factory.mktemp("imap-abuse"),
        auth={"allow_plaintext_loopback": True},
        limits={
            "max_message_size": LIMIT,
            "imap_timeout": TIMEOUT,
            "max_connections_per_ip": PER_IP,
        },
    )
    yield srv
    srv.stop()


@pytest.fixture
def client(server: PostofficeServer) -> Iterator[RawImap]:
    imap = RawImap(server)
    imap.login()
    yield imap
    imap.close()


def pid(srv: PostofficeServer) -> int:
    assert srv.proc is not None
    return srv.proc.pid


def read_to_close(sock: socket.socket, deadline: float) -> bool:
    """Read what is waiting until the server closes (True) or ``deadline``."""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(1 << 20):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def stored(srv: PostofficeServer) -> list[Path]:
    """alice's message files in every folder, tmp/ too."""
    return [p for p in srv.maildir(ALICE).rglob("*/*") if p.parent.name in ("tmp", "new", "cur")]


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- APPENDLIMIT: a literal over it is refused before it is sent ------------------------
def test_appendlimit_is_advertised_with_max_message_size(server: PostofficeServer) -> None:
    imap = RawImap(server)
    try:
        assert f" APPENDLIMIT={LIMIT}]".encode() in imap.greeting, imap.greeting
        reply = imap.cmd("A", b"CAPABILITY")
        assert reply[0].startswith(b"* CAPABILITY ") and f" APPENDLIMIT={LIMIT} ".encode() in (
            reply[0].rstrip(b"\r\n") + b" "
        ), reply
    finally:
        imap.close()


def test_a_synchronizing_literal_over_appendlimit_is_refused_before_the_continuation(
    server: PostofficeServer, client: RawImap
) -> None:
    before = rss_kib(pid(server))
    reply = client.cmd("A", f"APPEND INBOX {{{FLOOD}}}".encode())
    # NO [TOOBIG] instead of "+": the client never sends the 10 MiB (RFC 9051 §4.3, RFC 7889).
    assert reply == [b"A NO [TOOBIG] Literal too big\r\n"], reply
    # One octet over the limit is refused too; at the limit the "+" comes.
    assert client.cmd("B", f"APPEND INBOX {{{LIMIT + 1}}}".encode()) == [
        b"B NO [TOOBIG] Literal too big\r\n"
    ]
    client.send(f"C APPEND INBOX {{{LIMIT}}}\r\n".encode())
    assert client.line() == b"+ Ready for literal data\r\n"
    client.send(b"x" * (LIMIT - 2) + b"\r\n" + b"\r\n")
    assert client.until("C")[-1].startswith(b"C OK [APPENDUID "), "append at the limit"
    assert client.cmd("D", b"NOOP") == [b"D OK NOOP completed\r\n"]
    assert rss_kib(pid(server)) - before < GROWTH_KIB


def test_a_non_synchronizing_literal_over_the_limit_ends_the_connection_unread(
    server: PostofficeServer, client: RawImap
) -> None:
    before = rss_kib(pid(server))
    client.send(f"A APPEND INBOX {{{FLOOD}+}}\r\n".encode())
    # RFC 7888 §4: the server may end the connection rather than read what it refuses.
    assert client.line() == b"A BAD [TOOBIG] Literal too big\r\n"
    assert client.line() == b"* BYE Too much input refused\r\n"
    assert client.line() == b""
    with contextlib.suppress(OSError):
        for _ in range(FLOOD // 65536):
            client.send(b"x" * 65536)
    assert rss_kib(pid(server)) - before < GROWTH_KIB
    assert not stored(server)  # nothing, not even in tmp/


# --- lines and nesting --------------------------------------------------------------------------
def test_a_100_kib_command_line_is_refused_and_the_session_goes_on(client: RawImap) -> None:
    reply = client.cmd("A", b"NOOP " + b"x" * (100 * 1024))
    assert reply == [b"A BAD Line too long\r\n"], reply
    assert client.cmd("B", b"NOOP") == [b"B OK NOOP completed\r\n"]


def test_a_100_kib_line_inside_a_literal_command_is_refused_too(client: RawImap) -> None:
    client.send(b"A LOGIN {5}\r\n")  # not allowed now, and then a huge line
    assert client.line() == b"A BAD LOGIN is not valid in the authenticated state\r\n"
    reply = client.cmd("B", b"SELECT " + b"y" * (100 * 1024))
    assert reply == [b"B BAD Line too long\r\n"], reply
    assert client.cmd("C", b"NOOP") == [b"C OK NOOP completed\r\n"]


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        (b"SEARCH " + b"(" * 1000 + b"ALL" + b")" * 1000, b"A BAD Nested too deeply\r\n"),
        (b"SEARCH " + b"NOT " * 1000 + b"ALL", b"A BAD Nested too deeply\r\n"),
        (b"SEARCH " + b"OR ALL " * 1000 + b"ALL", b"A BAD Nested too deeply\r\n"),
        # FETCH and STORE lists do not nest: the second "(" is no attribute or flag.
        (
            b"FETCH 1 " + b"(" * 1000 + b"FLAGS" + b")" * 1000,
            b"A BAD Unknown fetch attribute ?\r\n",
        ),
        (b"STORE 1 +FLAGS " + b"(" * 1000 + b")" * 1000, b"A BAD Expected an atom\r\n"),
        (b"LIST " + b"(" * 1000 + b') "" *', b"A BAD Expected an atom\r\n"),
    ],
    ids=["parens", "not", "or", "fetch", "store", "list"],
)
def test_1000_nested_parentheses_do_no_harm(
    server: PostofficeServer, client: RawImap, command: bytes, expect: bytes
) -> None:
    assert client.cmd("S", b"SELECT INBOX")[-1].startswith(b"S OK [READ-WRITE]")
    assert client.cmd("A", command) == [expect]
    assert client.cmd("B", b"NOOP") == [b"B OK NOOP completed\r\n"]
    assert b"Traceback" not in server.log().encode()


# --- sequence sets ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "expect"),
    [
        (b"FETCH 1:* FLAGS", [b"A OK FETCH completed\r\n"]),
        (b"FETCH 1:4294967295 FLAGS", [b"A OK FETCH completed\r\n"]),
        (b"UID FETCH 1:* FLAGS", [b"A OK FETCH completed\r\n"]),
        (b"SEARCH 1:*", [b"* SEARCH\r\n", b"A OK SEARCH completed\r\n"]),
        (b"SEARCH 1:4294967295", [b"* SEARCH\r\n", b"A OK SEARCH completed\r\n"]),
        (b"UID SEARCH UID 1:4294967295", [b"* SEARCH\r\n", b"A OK SEARCH completed\r\n"]),
        (b"STORE 1:* +FLAGS (\\Seen)", [b"A OK STORE completed\r\n"]),
        (b"FETCH 4294967296 FLAGS", [b"A BAD Number out of range\r\n"]),
        (b"FETCH 0:5 FLAGS", [b"A BAD Expected a non-zero number\r\n"]),
    ],
)
def test_sequence_sets_on_an_empty_mailbox_are_answered_cleanly(
    client: RawImap, command: bytes, expect: list[bytes]
) -> None:
    assert client.cmd("S", b"SELECT INBOX")[-1].startswith(b"S OK [READ-WRITE]")
    assert client.cmd("A", command) == expect
    assert client.cmd("B", b"NOOP") == [b"B OK NOOP completed\r\n"]


def test_a_sequence_set_of_too_many_ranges_is_refused(client: RawImap) -> None:
    assert client.cmd("S", b"SELECT INBOX")[-1].startswith(b"S OK [READ-WRITE]")
    many = b",".join(b"%d" % n for n in range(1, 12000))  # 11,999 ranges in 64 KiB
    assert client.cmd("A", b"FETCH " + many + b" FLAGS") == [
        b"A BAD Too many ranges in sequence set\r\n"
    ]
    big = b",".join(b"%d:%d" % (n, n + 4000000) for n in range(1, 4000))  # 4 x 10^9 numbers
    assert client.cmd("B", b"SEARCH UID " + big) == [b"* SEARCH\r\n", b"B OK SEARCH completed\r\n"]
    assert client.cmd("C", b"NOOP") == [b"C OK NOOP completed\r\n"]


# --- stalls: a literal announced and never sent ---------------------------------------------
@pytest.mark.parametrize("command", [b"A LOGIN {5}", b"A APPEND INBOX {100}"])
def test_a_literal_announced_and_never_sent_is_timed_out(
    server: PostofficeServer, command: bytes
) -> None:
    imap = RawImap(server)
    try:
        if b"APPEND" in command:
            imap.login()
        imap.send(command + b"\r\n")
        assert imap.line() == b"+ Ready for literal data\r\n"
        started = time.monotonic()
        if b"APPEND" in command:
            imap.send(b"x" * 50)  # half of it, then nothing
        assert imap.line() == b"* BYE Autologout; idle for too long\r\n"
        assert imap.line() == b""
        assert TIMEOUT - 0.5 < time.monotonic() - started < TIMEOUT + 5
    finally:
        imap.close()
    assert not stored(server)


# --- mailbox names ------------------------------------------------------------------------------
HOSTILE_NAMES = [
    (b'"../x"', b"NO [CANNOT]"),
    (b'"a/../../b"', b"NO [CANNOT]"),
    (b'"..x"', b"NO [CANNOT]"),
    (b'"a..b"', b"NO [CANNOT]"),
    (b'"/etc/passwd"', b"NO [CANNOT]"),
    (b"{5+}\r\na\x00b/c", b"BAD"),
    (b'"a\x01b"', b"BAD"),
    (b'"a\x7fb"', b"BAD"),
    (b'"' + b"a." * 299 + b'a"', b"NO [CANNOT]"),  # 300 levels
    (b'"' + b"a" * 300 + b'"', b"NO [CANNOT]"),  # one level over NAME_MAX
]


@pytest.mark.parametrize(("name", "expect"), HOSTILE_NAMES)
def test_hostile_mailbox_names_are_refused_and_create_nothing(
    server: PostofficeServer, client: RawImap, name: bytes, expect: bytes
) -> None:
    data = server.data_dir
    before = all_files(data)
    client.cmd("O", b'DELETE "Plain"')  # left by a failed run
    before = all_files(data)
    assert client.cmd("P", b'CREATE "Plain"')[-1] == b"P OK CREATE completed\r\n"
    made = all_files(data) - before
    for n, command in enumerate(
        [
            b"CREATE " + name,
            b'RENAME "Plain" ' + name,
            b"RENAME " + name + b' "Other"',
            b"SELECT " + name,
            b"EXAMINE " + name,
            b"STATUS " + name + b" (MESSAGES)",
            b"DELETE " + name,
            b"SUBSCRIBE " + name,
            b"APPEND " + name + b" {3+}\r\nx\r\n",
        ]
    ):
        tag = f"T{n}"
        reply = client.cmd(tag, command)
        assert len(reply) == 1 and reply[0].startswith(f"{tag} ".encode() + expect), (
            command[:40],
            reply,
        )
    assert all_files(data) - before == made  # only Plain's own directory and files
    assert client.cmd("Q", b'DELETE "Plain"')[-1] == b"Q OK DELETE completed\r\n"
    assert not (data.parent / "x").exists() and not (data / "b").exists()


# --- password guessing: the throttle POP3 and SMTP share -----------------------------------------
FREE, CAP = 2, 4.0
PROMPT = 1.5
ADDRESS_BUDGET = 30  # [auth] throttle_address_failures, default


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[PostofficeServer]:
    srv = make_server(
        tmp_path,
        auth={"allow_plaintext_loopback": True, "throttle_after": FREE, "throttle_max_delay": CAP},
    )
    yield srv
    srv.stop()


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def guess(imap: RawImap, tag: str, user: str, password: str, sasl: bool) -> tuple[bytes, float]:
    started = time.monotonic()
    if sasl:
        reply = imap.cmd(tag, b"AUTHENTICATE PLAIN " + plain(user, password))
    else:
        reply = imap.cmd(tag, f'LOGIN "{user}" "{password}"'.encode())
    assert len(reply) == 1, reply
    return reply[0], time.monotonic() - started


def test_guessing_is_slowed_per_pair_and_the_right_password_answered_at_once(
    guarded: PostofficeServer,
) -> None:
    results = []
    for i in range(FREE + 2):
        imap = RawImap(guarded, timeout=CAP + 30)
        results.append(guess(imap, "A", ALICE, f"guess-{i}", sasl=bool(i % 2)))
        imap.close()
    assert [line for line, _ in results] == [
        b"A NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
    ] * (FREE + 2)
    times = [took for _, took in results]
    assert times[FREE] >= 0.9 and times[FREE + 1] >= 1.9, times  # as POP3's: 1 s, then 2 s
    imap = RawImap(guarded)
    started = time.monotonic()
    imap.login()
    assert time.monotonic() - started < PROMPT
    imap.close()
    log = guarded.log()
    assert log.count(f"auth failed protocol=imap client=127.0.0.1 user={ALICE}") == FREE + 2
    assert "guess-" not in log


def test_thirty_wrong_passwords_meet_the_address_budget_and_each_connection_ends_after_three(
    guarded: PostofficeServer,
) -> None:
    judged: list[bytes] = []
    n = 0
    while n < ADDRESS_BUDGET:
        imap = RawImap(guarded, timeout=CAP + 30)
        for k in range(MAX_AUTH_FAILURES):
            line, _ = guess(imap, f"G{k}", f"user{n}@example.test", "guess", sasl=bool(n % 2))
            judged.append(line)
            n += 1
        # POP3's rule: the third failure on one connection ends it.
        assert imap.line() == b"* BYE Too many failed logins\r\n"
        assert imap.line() == b""
        imap.close()
    assert judged == [
        f"G{k % MAX_AUTH_FAILURES} NO [AUTHENTICATIONFAILED] Authentication failed\r\n".encode()
        for k in range(ADDRESS_BUDGET)
    ]
    # The budget is spent: further guesses are refused at once, unjudged (RFC 5530 UNAVAILABLE).
    imap = RawImap(guarded, timeout=CAP + 30)
    for k, sasl in enumerate([False, True]):
        line, took = guess(imap, f"R{k}", "more@example.test", "guess", sasl)
        assert line == f"R{k} NO [UNAVAILABLE] Too many failed logins, try again later\r\n".encode()
        assert took < PROMPT, took
    imap.close()
    assert "user=more@example.test" not in guarded.log()  # refused: not judged, not hashed


# --- clients that hold slots -------------------------------------------------------------------
@pytest.mark.parametrize("port", ["imaps", "imap"])
def test_connections_over_the_per_address_cap_are_closed_at_accept(
    server: PostofficeServer, port: str
) -> None:
    pid_ = pid(server)
    before = settled_socket_fds(pid_)
    socks = [socket.create_connection(("127.0.0.1", server.ports[port])) for _ in range(40)]
    try:
        if port == "imaps":
            # Counted from accept(): idle TCP connections hold the slots before
            # any handshake, and the others are closed without one.
            closed = [closed_by_server(s, 0.2) for s in socks]
            assert closed == [False] * PER_IP + [True] * (40 - PER_IP)
        else:
            lines = []
            for s in socks:
                s.settimeout(5)
                lines.append(s.recv(200))
            busy = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
            assert all(line.startswith(b"* OK [CAPABILITY ") for line in lines[:PER_IP]), lines
            assert lines[PER_IP:] == [busy] * (40 - PER_IP)
            assert all(closed_by_server(s, 2) for s in socks[PER_IP:])
        assert socket_fds(pid_) - before == PER_IP
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError, ssl.SSLError):
            imap = RawImap(server, port)
            imap.close()
            if imap.greeting.startswith(b"* OK [CAPABILITY "):
                break
        assert time.monotonic() < deadline, "not served again"
        time.sleep(0.3)


def test_a_client_that_never_reads_is_cut_off_and_blocks_no_one(server: PostofficeServer) -> None:
    new = server.maildir(ALICE) / "new"
    for n in range(4):
        (new / f"{n}.big:2,").write_bytes(b"Subject: big\r\n\r\n" + b"y" * (2 * MiB - 20))
    hogs: list[socket.socket] = []
    try:
        for _ in range(PER_IP):  # every slot of the address
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.bind((HOGS, 0))
            hog.connect(("127.0.0.1", server.ports["imap"]))
            hog.sendall(f'L LOGIN "{ALICE}" "{ALICE_PW}"\r\nS SELECT INBOX\r\n'.encode())
            hogs.append(hog)
        with ThreadPoolExecutor(PER_IP) as pool:
            sent = list(
                pool.map(lambda h: pipeline_without_reading(h, b"F FETCH 1:* BODY[]\r\n"), hogs)
            )
        assert all(sent)
        started = time.monotonic()
        # Others are served meanwhile, promptly (the hogs wait in drain(), not the loop).
        other = RawImap(server)
        other.login()
        assert other.cmd("S", b"SELECT INBOX")[-1].startswith(b"S OK")
        t0 = time.monotonic()
        reply = other.cmd("F", b"FETCH 1 (RFC822.SIZE)")
        assert reply[-1] == b"F OK FETCH completed\r\n" and time.monotonic() - t0 < 2
        other.close()
        # Each hog is cut off once a write has waited TIMEOUT (reading from
        # them here would let the server go on): their sessions end, logged.
        ended = f"imap session client={HOGS} user={ALICE} tls=no end=timeout"
        assert wait_for(lambda: server.log().count(ended) == PER_IP, TIMEOUT + 20), server.log()
        assert time.monotonic() - started > TIMEOUT - 0.5
        assert "storage failed" not in server.log()  # a dead client is no storage fault
        # ... and every slot of the address is free again.
        fresh = [RawImap(server, source=HOGS) for _ in range(PER_IP)]
        assert all(c.greeting.startswith(b"* OK [CAPABILITY ") for c in fresh)
        for c in fresh:
            c.close()
    finally:
        for hog in hogs:
            hog.close()
        for path in stored(server):
            path.unlink()


# --- COMPRESS=DEFLATE (RFC 4978 §6): a deflate bomb, a broken stream ------------------------
BOMB = 256 * MiB  # of plaintext, about 256 KiB on the wire (DEFLATE tops out near 1032:1)


def compressed(client: RawImap) -> zlib._Compress:
    """COMPRESS DEFLATE on ``client``; the deflater for what it sends next."""
    assert client.cmd("Z", b"COMPRESS DEFLATE") == [b"Z OK DEFLATE active\r\n"]
    client.file = zlib_reader(client.sock)
    return zlib.compressobj(9, zlib.DEFLATED, -15)


def zlib_reader(sock: socket.socket) -> io.BufferedReader:
    """A file of the server's inflated output (``RawImap.line`` reads it)."""
    inflater = zlib.decompressobj(-15)

    class Inflated(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            data = b""
            while not data:
                raw = sock.recv(65536)
                if not raw:
                    return 0
                data = inflater.decompress(raw)
            buffer[: len(data)] = data
            return len(data)

    return io.BufferedReader(Inflated(), 1 << 20)


def test_a_deflate_bomb_is_read_in_bounded_pieces_and_the_session_goes_on(
    server: PostofficeServer, client: RawImap
) -> None:
    deflater = compressed(client)
    before = rss_kib(pid(server))
    started = time.monotonic()
    bomb = deflater.compress(b"A NOOP " + b"\0" * BOMB + b"\r\n")
    bomb += deflater.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < BOMB // 500
    client.send(bomb)
    # The line is refused like any over-long line: never held whole (the
    # connection inflates at most 64 KiB at a time, net/compress.py).
    assert client.until("A") == [b"A BAD Line too long\r\n"]
    client.send(deflater.compress(b"B NOOP\r\n") + deflater.flush(zlib.Z_SYNC_FLUSH))
    assert client.until("B") == [b"B OK NOOP completed\r\n"]
    assert rss_kib(pid(server)) - before < GROWTH_KIB
    assert time.monotonic() - started < 15  # inflating is cheap; no quadratic copy


def test_a_broken_compressed_stream_ends_the_session_logged(
    server: PostofficeServer, client: RawImap
) -> None:
    compressed(client)
    client.send(b"\xff\xff\xff\xff this is not DEFLATE\r\n")
    assert read_to_close(client.sock, time.monotonic() + 10)
    ended = f'user={ALICE} tls=no end="invalid compressed data'
    assert wait_for(lambda: ended in server.log()), server.log()
    assert "Traceback" not in server.log()
