"""Helpers for the abuse, fault and load tests: servers with two users, raw clients.

Every one of those tests talks to the real server over real sockets, as an
attacker (or a crowd) would.
"""

from __future__ import annotations

import asyncio
import base64
import os
import poplib
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
BOB, BOB_PW = "bob@example.test", "bob-password-2"


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Pop3From(poplib.POP3_SSL):
    """POP3 over TLS, optionally from a chosen source address (poplib has no
    such option), certificate unchecked."""

    def __init__(self, host: str, port: int, source: str | None, timeout: float = 30) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout, context=tls_context())

    def _create_socket(self, timeout: float) -> socket.socket:
        source = (self.source, 0) if self.source else None
        sock = socket.create_connection((self.host, self.port), timeout, source_address=source)
        return self.context.wrap_socket(sock, server_hostname=self.host)


def make_server(root: Path, **sections: dict[str, Any]) -> PostofficeServer:
    srv = PostofficeServer(root, sections=sections)
    srv.add_user(ALICE, ALICE_PW)
    srv.add_user(BOB, BOB_PW)
    srv.start()
    return srv


def raw(
    srv: PostofficeServer, port: str = "smtp", *, ehlo: bool = True, source: str | None = None
) -> RawSmtp:
    """A connected raw SMTP client past the greeting (and EHLO)."""
    client = RawSmtp("127.0.0.1", srv.ports[port], source=source)
    if port == "submissions":
        client.starttls()
    code, lines = client.reply()
    assert code == 220, lines
    if ehlo:
        assert client.cmd("EHLO client.test")[0] == 250
    return client


def plain_auth(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def submission(srv: PostofficeServer, user: str = ALICE, password: str = ALICE_PW) -> RawSmtp:
    """A raw client on 587 after STARTTLS and a successful AUTH PLAIN."""
    client = raw(srv, "submission")
    assert client.cmd("STARTTLS")[0] == 220
    client.starttls()
    assert client.cmd("EHLO client.test")[0] == 250
    code, lines = client.cmd(f"AUTH PLAIN {plain_auth(user, password)}")
    assert code == 235, lines
    return client


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, step: float = 0.05) -> bool:
    """Poll ``predicate`` every ``step`` seconds until it holds (True) or
    ``timeout`` seconds have passed (its last answer).  The one poller of the
    test suite: for what a server or peer does on its own time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# A delivery program for fetchmail, getmail and the like (``python -c MDA
# DIR``): each message read from stdin becomes the next numbered file in DIR.
MDA = """
import os, sys
out = sys.argv[1]
data = sys.stdin.buffer.read()
with open(os.path.join(out, "%06d" % len(os.listdir(out))), "wb") as fh:
    fh.write(data)
"""


async def until(predicate: Callable[[], object], timeout: float = 15.0, step: float = 0.01) -> bool:
    """``wait_for`` from inside an event loop: polls without blocking it, so
    the in-process server under test runs meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())


def empty_mailboxes(srv: PostofficeServer) -> None:
    """Remove every message; the Maildirs stay (the server remembers them)."""
    for sub in ("tmp", "new", "cur"):
        for path in (srv.data_dir / "mail").glob(f"*/*/{sub}/*"):
            path.unlink()


def queued(srv: PostofficeServer) -> list[Path]:
    """Messages waiting in the outbound queue."""
    qdir = srv.data_dir / "queue"
    return sorted(qdir.glob("*.msg")) if qdir.is_dir() else []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_until_killed(
    srv: PostofficeServer,
    *,
    clients: int,
    kill_after: int,
    message: Callable[[str], bytes],
    rcpts: list[str],
    per_client: int = 100,
    one_connection: bool = False,
    prefix: str = "",
) -> list[str]:
    """``clients`` threads send tagged messages (``message(tag)``, tags
    ``{prefix}c<n>-m<i>``) to ``rcpts`` -- a connection per message, or one
    per client with ``one_connection`` -- and the server is killed (-9) once
    ``kill_after`` were acknowledged.  Returns the acknowledged tags."""
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(s: smtplib.SMTP, tag: str) -> None:
        s.sendmail("load@remote.test", rcpts, message(tag))
        with lock:
            acknowledged.append(tag)

    def client(n: int) -> None:
        tags = (f"{prefix}c{n}-m{i}" for i in range(per_client))  # bounded; the kill comes first
        try:
            if one_connection:
                with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) as s:
                    for tag in tags:
                        if stop.is_set():
                            return
                        send(s, tag)
            else:
                for tag in tags:
                    if stop.is_set():
                        return
                    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
                        send(s, tag)
        except (OSError, smtplib.SMTPException):
            return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < kill_after and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= kill_after
    return list(acknowledged)


def smtp_processes(pid: int) -> list[int]:
    """The extra smtp processes of server ``pid`` (not its DKIM verifiers,
    which are its children too)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"run_smtp_process" in cmdline:
                found.append(int(entry))
    return found
