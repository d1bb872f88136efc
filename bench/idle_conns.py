"""Idle connections: how many a server holds and what each one costs in memory.

Opens N plain TCP connections to a port, reads each greeting, waits, measures
the server's memory, then proves every connection is still served (one NOOP
each, answered).  Used by bench/run.py; runnable alone::

    python bench/idle_conns.py --port 2525 --count 10000 --pid PID [--proto smtp|pop3|imap]

``imap-idle`` goes further on each connection: LOGIN, SELECT INBOX, IDLE
(RFC 2177), and the check afterwards is DONE, answered by the IDLE's tagged
OK (the session was held and still answers).  A postoffice session with a
mailbox selected holds one descriptor (its socket: the mailbox's SQLite
index and its inotify watch are shared by all its sessions in a process),
so 10,000 IDLE sessions need some 10,000 open files in the server, and as
many here.  ``raise_fd_limit`` lifts the limit as far as it may (the bench
machine's container stops at 20,000).

Loopback only; bounded in count (<= 15,000) and time.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

BATCH = 200
GREETING = {"smtp": b"220", "pop3": b"+OK", "imap": b"* OK", "imap-idle": b"* OK"}
# Any answer proves the connection is still served (POP3 refuses NOOP before
# login with -ERR, which is an answer too).
NOOP = {"smtp": b"NOOP\r\n", "pop3": b"NOOP\r\n", "imap": b"n NOOP\r\n", "imap-idle": b"DONE\r\n"}
NOOP_REPLY = {
    "smtp": (b"250",),
    "pop3": (b"+OK", b"-ERR"),
    "imap": (b"n OK",),
    "imap-idle": (b"i OK",),
}


@dataclass
class IdleResult:
    opened: int
    held: int  # answered a NOOP after the measurement
    before: int  # server memory in bytes before the first connection
    after: int  # ... with every connection open and idle
    seconds: float  # time to open them all

    @property
    def per_conn(self) -> float:
        return (self.after - self.before) / max(1, self.opened)


def raise_fd_limit(need: int) -> None:
    """At least ``need`` open files for this process and its children (the
    server under test inherits it); as root the hard limit is raised too
    (up to fs.nr_open), otherwise the soft one stops at the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < need and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, OSError):
            pass  # root without CAP_SYS_RESOURCE (a container): the soft limit only
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, need), hard))


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(64):  # bounded: a greeting or reply is one short line
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    return data


def _until_tagged(sock: socket.socket, tag: bytes) -> bytes:
    """Read until the line that starts with ``tag`` (an IMAP tagged reply, or
    ``+`` for a continuation); the untagged lines before it are skipped."""
    data = b""
    while len(data) < 1 << 20:  # bounded: untagged data of a SELECT is small
        lines = data.split(b"\r\n")
        for line in lines[:-1]:
            if line.startswith(tag):
                return line
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return b""


def _imap_idle(sock: socket.socket, login: tuple[str, str]) -> None:
    user, password = login
    sock.sendall(f'l LOGIN "{user}" "{password}"\r\n'.encode())
    if not (reply := _until_tagged(sock, b"l ")).startswith(b"l OK"):
        raise RuntimeError(f"IMAP LOGIN refused: {reply!r}")
    sock.sendall(b"s SELECT INBOX\r\n")
    if not (reply := _until_tagged(sock, b"s ")).startswith(b"s OK"):
        raise RuntimeError(f"IMAP SELECT refused: {reply!r}")
    sock.sendall(b"i IDLE\r\n")
    if not _until_tagged(sock, b"+"):
        raise RuntimeError("IMAP IDLE refused")


def measure(
    port: int,
    count: int,
    proto: str,
    memory: Callable[[], int],
    settle: float = 2.0,
    login: tuple[str, str] | None = None,
) -> IdleResult:
    if not 1 <= count <= 15_000:
        raise ValueError("count must be 1..15000")
    raise_fd_limit(count + 256)
    greeting = GREETING[proto]
    before = memory()
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for first in range(0, count, BATCH):
            group = []
            for _ in range(min(BATCH, count - first)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(60)
                s.connect(("127.0.0.1", port))
                group.append(s)
            for s in group:
                if not _recv_line(s).startswith(greeting):
                    raise RuntimeError(f"no greeting on connection {len(socks)}")
                socks.append(s)
                if proto == "imap-idle":
                    assert login is not None, "imap-idle needs login=(user, password)"
                    try:
                        _imap_idle(s, login)
                    except RuntimeError as exc:
                        raise RuntimeError(f"connection {len(socks)}: {exc}") from None
        seconds = time.monotonic() - started
        time.sleep(settle)
        after = memory()
        held = 0
        for first in range(0, len(socks), BATCH):
            group = socks[first : first + BATCH]
            for s in group:
                s.sendall(NOOP[proto])
            for s in group:
                tag = NOOP_REPLY[proto][0][:2]
                reply = _until_tagged(s, tag) if proto.startswith("imap") else _recv_line(s)
                if reply.startswith(NOOP_REPLY[proto]):
                    held += 1
        return IdleResult(len(socks), held, before, after, seconds)
    finally:
        for s in socks:
            s.close()


def main() -> int:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from benchlib import tree_rss

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--pid", type=int, required=True, help="server process (tree) to measure")
    ap.add_argument("--proto", choices=sorted(GREETING), default="smtp")
    a = ap.parse_args()
    r = measure(a.port, a.count, a.proto, lambda: tree_rss(a.pid))
    print(
        f"opened={r.opened} held={r.held} open_s={r.seconds:.1f} "
        f"rss_before_MiB={r.before / 2**20:.1f} rss_after_MiB={r.after / 2**20:.1f} "
        f"per_conn_KiB={r.per_conn / 1024:.1f}"
    )
    return 0 if r.held == r.opened == a.count else 1


if __name__ == "__main__":
    sys.exit(main())
