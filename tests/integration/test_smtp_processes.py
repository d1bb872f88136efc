"""``[limits] smtp_processes``: extra processes accepting on the smtp listener.

The real server with two smtp processes: connections are shared between
them, both deliver (Maildir names carry the delivering pid), an alias
forward accepted by either process is sent by the one outbound queue, the
connection caps hold for both processes together (a killed one's count
given back), and a ``kill -9`` of the server takes the extra process with
it while the restart restores what either acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.helpers import smtp_processes, wait_for
from tests.support.journal import pending_records
from tests.support.peers import SmtpSink
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

ALICE = "alice@example.test"
BODY = (b"p" * 70 + b"\r\n") * 30


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def two_process_server(tmp_path: Path, **sections: dict[str, object]) -> PostofficeServer:
    limits = {"smtp_processes": 2}
    srv = PostofficeServer(tmp_path, sections={"limits": limits, **sections})
    srv.add_user(ALICE, "alice-password-1")
    srv.start()
    assert wait_for(lambda: "smtp process 1 accepting" in srv.log(), 20), srv.log()
    return srv


def send_many(
    srv: PostofficeServer, clients: int, each: int, rcpts: list[str], prefix: str = ""
) -> list[str]:
    """``clients`` parallel connections, opened together and kept for ``each``
    messages each; the tags acknowledged."""
    acknowledged: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients, timeout=30)

    def client(n: int) -> None:
        try:
            ready.wait()  # all connect at once: the processes take turns accepting
            with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=20) as s:
                for i in range(each):
                    tag = f"{prefix}c{n}-m{i}"
                    msg = f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + BODY
                    s.sendmail("load@remote.test", rcpts, msg)
                    with lock:
                        acknowledged.append(tag)
        except (OSError, smtplib.SMTPException, threading.BrokenBarrierError):
            return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return acknowledged


def until_both_deliver(
    srv: PostofficeServer, clients: int, each: int, rcpts: list[str]
) -> list[str]:
    """Loads of ``clients`` connections until both processes took some (which
    process accepts a connection is the kernel's race to win; a handful of
    tries, each of many simultaneous connections, settles it)."""
    acknowledged: list[str] = []
    for attempt in range(5):
        acknowledged += send_many(srv, clients, each, rcpts, prefix=f"a{attempt}-")
        if len(stored(srv)[1]) == 2:
            break
    return acknowledged


def stored(srv: PostofficeServer) -> tuple[dict[str, int], set[int]]:
    """Tags stored for alice (with counts) and the pids that delivered them."""
    tags: dict[str, int] = {}
    pids: set[int] = set()
    for path in srv.messages(ALICE):
        content = path.read_bytes()
        assert content.endswith(BODY.replace(b"\r\n", b"\n")), f"partial file {path}"
        tag = content.split(b"X-Tag: ", 1)[1].split(b"\n", 1)[0].decode()
        tags[tag] = tags.get(tag, 0) + 1
        pids.add(int(re.search(r"P(\d+)Q", path.name).group(1)))  # type: ignore[union-attr]
    return tags, pids


def test_two_processes_share_the_connections_and_both_deliver(tmp_path: Path) -> None:
    srv = two_process_server(tmp_path)
    try:
        assert srv.proc is not None
        server_pid, (extra_pid,) = srv.proc.pid, smtp_processes(srv.proc.pid)
        acknowledged = until_both_deliver(srv, clients=12, each=8, rcpts=[ALICE])
        assert len(acknowledged) % 96 == 0
        tags, pids = stored(srv)
        assert tags == {t: 1 for t in acknowledged}
        assert pids == {server_pid, extra_pid}  # both took connections
        assert "(2 processes)" in srv.log()
    finally:
        code = srv.stop()
    assert code == 0
    assert not alive(extra_pid)  # SIGTERM stops the extra process too
    assert "Traceback" not in srv.log()


def sockets_of(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def test_connections_arriving_together_are_shared_evenly(tmp_path: Path) -> None:
    """20 clients connecting at once: each process takes its turn, instead of
    the first to wake taking them all (seen 0/20 before AcceptShares)."""
    srv = two_process_server(tmp_path)
    clients: list[socket.socket] = []
    try:
        assert srv.proc is not None
        server_pid, (extra_pid,) = srv.proc.pid, smtp_processes(srv.proc.pid)
        before = {pid: sockets_of(pid) for pid in (server_pid, extra_pid)}
        for _ in range(20):
            clients.append(socket.create_connection(("127.0.0.1", srv.ports["smtp"]), timeout=20))
        for client in clients:  # every one accepted and greeted
            assert client.recv(512).startswith(b"220 ")
        held = {pid: sockets_of(pid) - before[pid] for pid in before}
        assert sum(held.values()) == 20, held
        # Even on a loaded machine the turns hold within a few connections.
        assert min(held.values()) >= 6, held
    finally:
        for client in clients:
            client.close()
        srv.stop()


def test_an_alias_forward_accepted_by_either_process_is_sent(tmp_path: Path) -> None:
    port = free_port()
    relay = SmtpSink(tmp_path, "127.0.0.1", port).start()
    try:
        srv = two_process_server(
            tmp_path, relay={"smarthost": f"127.0.0.1:{port}", "retry_schedule": [1]}
        )
        srv.cli("alias", "add", "fwd@example.test", ALICE, "friend@remote.test")
        try:
            acknowledged = until_both_deliver(srv, clients=8, each=3, rcpts=["fwd@example.test"])
            assert len(acknowledged) % 24 == 0
            _tags, pids = stored(srv)  # the local copies tell which process took each
            assert len(pids) == 2
            assert wait_for(lambda: len(relay.messages()) == len(acknowledged), 30)
            sent = b"".join(relay.messages())
            assert all(f"X-Tag: {t}".encode() in sent for t in acknowledged)
            queue = srv.data_dir / "queue"
            assert wait_for(lambda: not [p for p in queue.iterdir() if p.name != "tmp"], 10)
        finally:
            srv.stop()
    finally:
        relay.stop()


@pytest.mark.faults
def test_kill_9_takes_the_extra_process_along_and_loses_nothing(tmp_path: Path) -> None:
    srv = two_process_server(tmp_path)
    assert srv.proc is not None
    (extra_pid,) = smtp_processes(srv.proc.pid)
    acknowledged: list[str] = []
    done = threading.Event()

    def load() -> None:
        acknowledged.extend(send_many(srv, clients=8, each=40, rcpts=[ALICE]))
        done.set()

    loader = threading.Thread(target=load)
    loader.start()
    deadline = time.monotonic() + 30
    while not acknowledged and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    srv.kill()
    loader.join(60)
    assert wait_for(lambda: not alive(extra_pid), 10), "the extra process outlived its server"
    # What a power cut may leave of files the journals had not yet retired.
    for directory in [srv.data_dir / "journal", srv.data_dir / "journal-w1"]:
        for record in pending_records(directory):
            for target in record.targets:
                path = srv.data_dir / "mail" / target
                if path.exists():
                    path.write_bytes(b"")
    srv.start()
    try:
        tags, _pids = stored(srv)
        assert [t for t in acknowledged if t not in tags] == []
        assert all(n == 1 for n in tags.values())
        for directory in [srv.data_dir / "journal", srv.data_dir / "journal-w1"]:
            assert pending_records(directory) == []
    finally:
        srv.stop()


BUSY = b"421 4.7.0 Too many connections, try again later\r\n"


def greeting(srv: PostofficeServer, source: str) -> tuple[socket.socket, bytes]:
    """A connection from ``source`` (kept open) and the first line it gets."""
    sock = socket.create_connection(
        ("127.0.0.1", srv.ports["smtp"]), timeout=10, source_address=(source, 0)
    )
    line = b""
    with contextlib.suppress(OSError):
        while not line.endswith(b"\n"):
            chunk = sock.recv(512)
            if not chunk:
                break
            line += chunk
    return sock, line


def settled_sockets(pids: list[int], expect: int, within: float = 10) -> dict[int, int]:
    """Socket descriptors per process once they add up to ``expect`` (a refused
    client's socket is closed just after its 421)."""
    held: dict[int, int] = {}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        held = {pid: sockets_of(pid) for pid in pids}
        if sum(held.values()) == expect:
            break
        time.sleep(0.05)
    return held


def test_the_connection_caps_hold_across_both_processes(tmp_path: Path) -> None:
    """Per address and in all, counted by both processes together: with each
    process counting alone, 2 x 4 connections from one address (and 2 x 6 in
    all) would be let in.  A killed process's connections count no more."""
    srv = two_process_server(
        tmp_path, limits={"smtp_processes": 2, "max_connections_per_ip": 4, "max_connections": 6}
    )
    clients: list[socket.socket] = []
    try:
        assert srv.proc is not None
        server_pid, (extra_pid,) = srv.proc.pid, smtp_processes(srv.proc.pid)
        pids = [server_pid, extra_pid]
        idle = {pid: sockets_of(pid) for pid in pids}
        for _attempt in range(5):  # until the four land on both processes
            for sock in clients:
                sock.close()
            clients = []
            settled_sockets(pids, sum(idle.values()))
            for _ in range(4):
                sock, line = greeting(srv, "127.0.0.1")
                clients.append(sock)
                assert line.startswith(b"220 "), line
            held = settled_sockets(pids, sum(idle.values()) + 4)
            on = {pid: held[pid] - idle[pid] for pid in pids}
            if min(on.values()) > 0:
                break
        assert min(on.values()) > 0, on  # each process alone holds fewer than 4
        # The fifth from the same address: refused, whichever process took it.
        for _ in range(4):
            sock, line = greeting(srv, "127.0.0.1")
            sock.close()
            assert line == BUSY
        # Another address is another client, up to 6 connections in all ...
        others = [greeting(srv, "127.0.0.2") for _ in range(2)]
        assert [line[:4] for _sock, line in others] == [b"220 "] * 2
        # ... then the total cap, for a third address too.
        for _ in range(4):
            sock, line = greeting(srv, "127.0.0.3")
            sock.close()
            assert line == BUSY
        for sock, _line in others:
            sock.close()
        held = settled_sockets(pids, sum(idle.values()) + 4)

        # kill -9 the extra process: what it held counts no more (the server
        # gives its column back before it starts the next one).
        on_server = held[server_pid] - idle[server_pid]
        os.kill(extra_pid, signal.SIGKILL)
        assert wait_for(lambda: srv.log().count("smtp process 1 accepting") == 2, 20)
        admitted = 0
        for _ in range(6):
            sock, line = greeting(srv, "127.0.0.1")
            clients.append(sock)
            if line == BUSY:
                break
            assert line.startswith(b"220 "), line
            admitted += 1
        assert admitted == 4 - on_server, (admitted, on_server)
    finally:
        for sock in clients:
            sock.close()
        srv.stop()
    assert "Traceback" not in srv.log()


def test_the_default_is_one_smtp_process_per_cpu(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"smtp_processes": None}})
    srv.start()
    try:
        assert srv.proc is not None
        server_pid = srv.proc.pid
        cpus = min(len(os.sched_getaffinity(0)), 64)
        assert wait_for(lambda: len(smtp_processes(server_pid)) == cpus - 1, 20)
        assert f"smtp_processes={cpus}" in srv.log()
        if cpus > 1:
            assert f"({cpus} processes)" in srv.log()
    finally:
        assert srv.stop() == 0


def test_a_retiring_process_killed_gives_back_its_connections(tmp_path: Path) -> None:
    """A reload that moves the smtp listener retires the extra process: it
    keeps its sessions, and its successor starts once it is gone.  Killed
    (-9) while retiring, what it held must count no more, as for a live one
    (workers.py ``watch``: the retiring branch gives its column back)."""
    srv = two_process_server(
        tmp_path, limits={"smtp_processes": 2, "max_connections_per_ip": 4, "max_connections": 50}
    )
    clients: list[socket.socket] = []
    try:
        assert srv.proc is not None
        server_pid, (extra_pid,) = srv.proc.pid, smtp_processes(srv.proc.pid)
        pids = [server_pid, extra_pid]
        idle = {pid: sockets_of(pid) for pid in pids}
        on: dict[int, int] = {}
        for _attempt in range(5):  # until some of the four land on the extra process
            for sock in clients:
                sock.close()
            clients = []
            settled_sockets(pids, sum(idle.values()))
            for _ in range(4):
                sock, line = greeting(srv, "127.0.0.1")
                clients.append(sock)
                assert line.startswith(b"220 "), line
            held = settled_sockets(pids, sum(idle.values()) + 4)
            on = {pid: held[pid] - idle[pid] for pid in pids}
            if on[extra_pid] > 0:
                break
        assert on[extra_pid] > 0, on
        # Move the smtp listener: the extra process retires with its sessions.
        old_port, new_port = srv.ports["smtp"], free_port()
        text = srv.config.read_text()
        srv.config.write_text(
            text.replace(f'smtp = ["127.0.0.1:{old_port}"]', f'smtp = ["127.0.0.1:{new_port}"]')
        )
        os.kill(server_pid, signal.SIGHUP)
        assert wait_for(lambda: "SIGHUP: reloaded" in srv.log()), srv.log()
        srv.ports["smtp"] = new_port
        time.sleep(1.5)  # the pool's watch has seen it retiring, not gone
        assert alive(extra_pid) and srv.log().count("smtp process 1 accepting") == 1
        os.kill(extra_pid, signal.SIGKILL)
        assert wait_for(lambda: srv.log().count("smtp process 1 accepting") == 2, 20), srv.log()
        admitted = 0
        for _ in range(6):
            sock, line = greeting(srv, "127.0.0.1")
            clients.append(sock)
            if line == BUSY:
                break
            assert line.startswith(b"220 "), line
            admitted += 1
        # Only the server's own sessions still count against the address.
        assert admitted == 4 - on[server_pid], (admitted, on)
    finally:
        for sock in clients:
            sock.close()
        srv.stop()
    assert "Traceback" not in srv.log()
