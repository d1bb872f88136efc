"""1,000 idle connections: what each costs, and a delivery still goes straight through.

An idle connection is a session waiting for its next command.  The server's
resident memory (VmRSS) is read before and after opening them; the growth
divided by their number is the cost of one idle connection, reported with
the other load figures (the target is 30 KiB; the test allows 64 KiB).
Meanwhile an ordinary delivery must finish in well under a second.
"""

from __future__ import annotations

import resource
import smtplib
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, make_server, rss_kib, tls_context
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.load

IDLE = 1000
IDLE_TLS = 200
LIMIT_KIB = 64  # per idle plaintext connection
LIMIT_TLS_KIB = 256  # per idle TLS connection (the TLS state is most of it)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostofficeServer]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * (IDLE + IDLE_TLS) + 200  # ours, the server's (inherited), headroom
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "raise ulimit -n"
    srv = make_server(
        tmp_path,
        limits={"max_connections": 3 * IDLE, "max_connections_per_ip": 3 * IDLE},
    )
    yield srv
    srv.stop()


def settle(pid: int) -> int:
    """RSS once it stops moving (the server is done admitting connections)."""
    last = rss_kib(pid)
    for _ in range(20):
        time.sleep(0.1)
        now = rss_kib(pid)
        if now == last:
            break
        last = now
    return last


def deliver(srv: PostofficeServer, n: int) -> float:
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
        client.sendmail("a@remote.test", [ALICE], f"Subject: during {n}\r\n\r\nhi\r\n".encode())
    return time.perf_counter() - started


def open_idle(srv: PostofficeServer, port: str, count: int, tls: bool) -> list[socket.socket]:
    socks: list[socket.socket] = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", srv.ports[port]), timeout=30)
        if tls:
            sock = tls_context().wrap_socket(sock)
        socks.append(sock)
        greeting = sock.recv(1024)
        assert greeting[:3] in (b"220", b"+OK"), greeting  # a live session, not refused
    return socks


def test_idle_connections_cost_little_and_block_nothing(
    server: PostofficeServer, report: Callable[[str, object, str], None]
) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    for n in range(3):  # warm up: first deliveries create directories, caches, threads
        deliver(server, n)
    socks: list[socket.socket] = []
    try:
        before = settle(pid)
        socks += open_idle(server, "smtp", IDLE // 2, tls=False)
        socks += open_idle(server, "pop3", IDLE // 2, tls=False)
        after = settle(pid)
        per_conn = (after - before) / IDLE
        report("idle connections (SMTP+POP3, plaintext)", IDLE, "open")
        report("memory per idle connection", per_conn, "KiB")

        times = [deliver(server, 10 + n) for n in range(5)]
        report(
            f"delivery with {IDLE} idle connections, median", 1000 * statistics.median(times), "ms"
        )
        report(f"delivery with {IDLE} idle connections, slowest", 1000 * max(times), "ms")

        before_tls = settle(pid)
        socks += open_idle(server, "submissions", IDLE_TLS // 2, tls=True)
        socks += open_idle(server, "pop3s", IDLE_TLS // 2, tls=True)
        per_tls = (settle(pid) - before_tls) / IDLE_TLS
        report("memory per idle TLS connection", per_tls, "KiB")
        report("server RSS with all idle connections", settle(pid) // 1024, "MiB")

        # The idle sessions are alive and answer (SMTP NOOP, POP3 CAPA).
        for sock in socks[:: IDLE // 20]:
            pop3 = sock.getpeername()[1] in (server.ports["pop3"], server.ports["pop3s"])
            sock.sendall(b"CAPA\r\n" if pop3 else b"NOOP\r\n")
            assert sock.recv(1024)[:3] == (b"+OK" if pop3 else b"250")
        assert statistics.median(times) < 1.0, times
        assert per_conn < LIMIT_KIB, per_conn
        assert per_tls < LIMIT_TLS_KIB, per_tls
        assert len(server.messages(ALICE)) == 8
    finally:
        for sock in socks:
            sock.close()
