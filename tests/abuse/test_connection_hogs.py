"""Clients that hold connection slots without using them (issue #11, items 5 and 7).

- Idle TCP connections to the implicit-TLS ports (465, 995) that never start
  a handshake: they count against ``max_connections_per_ip`` from accept()
  on, and one over the cap is closed at once, before any handshake, holding
  no descriptor.  (They used to count only once their handshake was done, so
  200 of them from one address held 200 descriptors for 30 s each.)
- A client that pipelines commands and never reads the replies: the server's
  write gives up after the protocol's timeout, and the slot is free again.
  (An SMTP session used to wait in drain() for ever: 1,000 such clients
  pinned every slot.)

Both run on the asyncio loop and on uvloop (tests/support/loops.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.helpers import ALICE, ALICE_PW, tls_context
from tests.support.loops import LOOPS, runs_uvloop, server_env
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.abuse

PER_IP = 5
TIMEOUT = 3.0  # smtp_timeout and pop3_timeout: each write waits at most this long
HOGS = "127.0.0.2"  # the never-reading clients' address (its own per-address count)


@pytest.fixture(scope="module", params=LOOPS)
def hogged(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostofficeServer]:
    root = tmp_path_factory.mktemp(f"hogs-{request.param}")
    srv = PostofficeServer(
        root,
        sections={
            "limits": {
                "max_connections_per_ip": PER_IP,
                "smtp_timeout": TIMEOUT,
                "pop3_timeout": TIMEOUT,
                # The default, one smtp process per CPU: the caps hold for
                # all of them together (net/caps.py).
                "smtp_processes": None,
            }
        },
    )
    srv.add_user(ALICE, ALICE_PW)
    srv.start(env=server_env(request.param, root))
    assert srv.proc is not None
    assert runs_uvloop(srv.proc.pid) == (request.param == "uvloop")
    yield srv
    srv.stop()


def socket_fds(pid: int) -> int:
    """The process's open socket descriptors."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def settled_socket_fds(pid: int) -> int:
    """``socket_fds`` once connections of an earlier test are gone (unchanged
    for half a second; at most 5 s)."""
    seen = [socket_fds(pid)]
    for _ in range(50):
        time.sleep(0.1)
        seen.append(socket_fds(pid))
        if len(set(seen[-5:])) == 1 and len(seen) >= 5:
            break
    return seen[-1]


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def greeting(srv: PostofficeServer, port: str, source: str = "127.0.0.1") -> bytes:
    """The first line a new client gets (TLS on the implicit-TLS ports)."""
    with socket.create_connection(
        ("127.0.0.1", srv.ports[port]), timeout=10, source_address=(source, 0)
    ) as raw:
        if port in ("submissions", "pop3s"):
            with tls_context().wrap_socket(raw) as tls:
                return read_line(tls)
        return read_line(raw)


def served_again(
    srv: PostofficeServer, port: str, expect: bytes, within: float, source: str = "127.0.0.1"
) -> bytes:
    """Connect every half second until a client is greeted with ``expect``
    (or ``within`` runs out); the last greeting."""
    deadline = time.monotonic() + within
    line = b""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ssl.SSLError):
            line = greeting(srv, port, source)
            if line.startswith(expect):
                return line
        time.sleep(0.5)
    return line


@pytest.mark.parametrize("port", ["pop3s", "submissions"])
def test_idle_tcp_connections_to_a_tls_port_count_from_accept(
    hogged: PostofficeServer, port: str
) -> None:
    assert hogged.proc is not None
    pid = hogged.proc.pid
    before = settled_socket_fds(pid)
    socks = [socket.create_connection(("127.0.0.1", hogged.ports[port])) for _ in range(40)]
    try:
        closed = [closed_by_server(s, 0.2) for s in socks]
        held = socket_fds(pid) - before
        # The first PER_IP wait for their handshake; every other one was
        # closed at accept, without a handshake and without a reply.
        assert closed == [False] * PER_IP + [True] * (40 - PER_IP)
        assert held == PER_IP
    finally:
        for s in socks:
            s.close()
    # Their counts go with them: a real TLS client is served again.
    expect = b"+OK" if port == "pop3s" else b"220 "
    assert served_again(hogged, port, expect, within=10).startswith(expect)


def pipeline_without_reading(sock: socket.socket, command: bytes) -> int:
    """Send ``command`` over and over without reading a reply, until the
    server stops taking them (0.5 s without progress), at most 64 MiB or 20 s.
    The octets sent."""
    chunk = command * (65536 // len(command))
    sock.settimeout(0.5)
    sent = 0
    deadline = time.monotonic() + 20
    with contextlib.suppress(TimeoutError, OSError):
        while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
            sent += sock.send(chunk)
    return sent


@pytest.mark.parametrize(
    ("port", "command", "expect"),
    [("smtp", b"EHLO x\r\n", b"220 "), ("pop3", b"CAPA\r\n", b"+OK")],
)
def test_a_client_that_never_reads_its_replies_loses_its_slot(
    hogged: PostofficeServer, port: str, command: bytes, expect: bytes
) -> None:
    hogs: list[socket.socket] = []
    try:
        for _ in range(PER_IP):  # every slot of this address
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
            hog.bind((HOGS, 0))
            hog.connect(("127.0.0.1", hogged.ports[port]))
            hogs.append(hog)
        with ThreadPoolExecutor(PER_IP) as pool:
            sent = list(pool.map(lambda hog: pipeline_without_reading(hog, command), hogs))
        assert all(sent)
        # The replies filled every buffer on the way: the sessions wait in
        # drain() and hold every slot of the address.
        line = greeting(hogged, port, HOGS)
        assert not line.startswith(expect), line
        # ... for TIMEOUT at most: then each hog is cut off and every slot is
        # free again, while the hogs still hold their ends open.
        assert served_again(hogged, port, expect, TIMEOUT + 15, HOGS).startswith(expect)
        assert all_slots_free(hogged, port, expect, within=TIMEOUT + 15)
    finally:
        for hog in hogs:
            hog.close()


def all_slots_free(srv: PostofficeServer, port: str, expect: bytes, within: float) -> bool:
    """PER_IP clients from the hogs' address are all greeted at once (tried
    every half second for ``within`` seconds)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        socks = [
            socket.create_connection(
                ("127.0.0.1", srv.ports[port]), timeout=10, source_address=(HOGS, 0)
            )
            for _ in range(PER_IP)
        ]
        try:
            if all(read_line(sock).startswith(expect) for sock in socks):
                return True
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.5)
    return False
