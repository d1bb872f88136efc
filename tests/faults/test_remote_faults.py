"""Outbound delivery against broken peers and broken DNS: deferred and retried, never lost or bounced.

A peer MTA that stalls mid-DATA, hangs up, or answers garbage, and a DNS
server that answers SERVFAIL or nothing at all, are temporary failures
(RFC 5321 §4.5.4.1): the message stays queued, is tried again, no bounce
goes to the sender, and once the world is well again it is delivered
exactly once.  kill -9 while a message is on the wire to a peer loses
nothing either.  (tests/integration/test_outbound.py covers 4xx, 5xx,
expiry and kill -9 while the peer sits on DATA.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.peers import FaultyMta, ServfailDns
from tests.support.helpers import ALICE, make_server, queued, rss_kib, submission, wait_for
from tests.support.peers import Dnsmasq, SmtpSink
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.faults

MX1, MX2 = "127.0.0.2", "127.0.0.3"
BIG = (b"b" * 76 + b"\r\n") * 27_000  # about 2 MiB: more than the socket buffers hold


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path_factory.mktemp("dns"),
        mx=[("remote.test", "mx1.remote.test", 10), ("other.test", "mx2.other.test", 10)],
        hosts={"mx1.remote.test": [MX1], "mx2.other.test": [MX2]},
    ).start()
    yield server
    server.stop()


@pytest.fixture
def port() -> int:
    return free_port((MX1, MX2))


@pytest.fixture
def peers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for peer in started:
        peer.stop()


def relay_server(root: Path, dns_server: str, port: int, **relay: Any) -> PostofficeServer:
    settings = {
        "mx_port": port,
        "dns_servers": [dns_server],
        "retry_schedule": [1],
        "warn_after": 0,
        "connect_timeout": 5,
        **relay,
    }
    return make_server(root, relay=settings)


def send(srv: PostofficeServer, rcpt: str, tag: str, body: bytes = b"short body\r\n") -> None:
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(f"From: {ALICE}\r\nSubject: {tag}\r\n\r\n".encode() + body + b".\r\n")
    assert client.reply()[0] == 250
    client.cmd("QUIT")


def deferrals(srv: PostofficeServer, rcpt: str) -> int:
    return len(re.findall(rf"to=<{re.escape(rcpt)}> .*result=deferred", srv.log()))


def assert_deferred_not_bounced(srv: PostofficeServer, rcpt: str) -> None:
    assert len(queued(srv)) == 1
    assert "result=bounced" not in srv.log() and "result=failed" not in srv.log()
    assert srv.messages(ALICE) == []  # no DSN to the sender
    assert f"<{rcpt}>" in srv.cli("queue", "list").stdout


def delivered_once(sink: SmtpSink, tag: str) -> bool:
    found = [m for m in sink.messages() if f"Subject: {tag}".encode() in m]
    return len(found) == 1


BROKEN = ["drop", "drop-after-dot", "garbage-greeting", "garbage-ehlo", "garbage-after-dot"]


@pytest.mark.parametrize("behaviour", BROKEN)
def test_broken_peer_is_retried_then_delivered_once(
    tmp_path: Path, dns: Dnsmasq, port: int, peers: list[Any], behaviour: str
) -> None:
    faulty = FaultyMta(MX1, port, behaviour).start()
    peers.append(faulty)
    srv = relay_server(tmp_path, dns.server, port)
    try:
        send(srv, "bob@remote.test", f"tag-{behaviour}", BIG if behaviour == "drop" else b"x\r\n")
        assert wait_for(lambda: faulty.sessions >= 2 and deferrals(srv, "bob@remote.test") >= 2)
        assert_deferred_not_bounced(srv, "bob@remote.test")
        faulty.stop()
        good = SmtpSink(tmp_path, MX1, port).start()
        peers.append(good)
        assert wait_for(lambda: delivered_once(good, f"tag-{behaviour}"))
        assert wait_for(lambda: queued(srv) == [])
        assert srv.messages(ALICE) == []
        assert len(good.messages()) == 1
    finally:
        srv.stop()


def test_endless_reply_line_is_cut_off_without_eating_memory(
    tmp_path: Path, dns: Dnsmasq, port: int, peers: list[Any]
) -> None:
    faulty = FaultyMta(MX1, port, "endless-reply").start()
    peers.append(faulty)
    srv = relay_server(tmp_path, dns.server, port)
    try:
        assert srv.proc is not None
        before = rss_kib(srv.proc.pid)
        send(srv, "bob@remote.test", "tag-endless")
        assert wait_for(lambda: deferrals(srv, "bob@remote.test") >= 1, 30)
        assert rss_kib(srv.proc.pid) - before < 8 * 1024  # 16 MiB were thrown at it
        assert_deferred_not_bounced(srv, "bob@remote.test")
    finally:
        srv.stop()


def test_a_stalled_peer_holds_up_nothing_else_and_is_retried(
    tmp_path: Path, dns: Dnsmasq, port: int, peers: list[Any]
) -> None:
    stalled = FaultyMta(MX1, port, "stall", hold=60).start()
    other = SmtpSink(tmp_path, MX2, port).start()
    peers += [stalled, other]
    srv = relay_server(tmp_path, dns.server, port)
    try:
        send(srv, "bob@remote.test", "tag-stalled", BIG)
        assert wait_for(lambda: len(stalled.octets) == 1)  # mid-message, and stuck there
        send(srv, "carol@other.test", "tag-other")
        assert wait_for(lambda: delivered_once(other, "tag-other"))  # not held up
        assert len(queued(srv)) == 1 and srv.messages(ALICE) == []
        stalled.stop()  # the stalled peer finally hangs up
        good = SmtpSink(tmp_path, MX1, port, name="good").start()
        peers.append(good)
        assert wait_for(lambda: delivered_once(good, "tag-stalled"), 30)
        (message,) = good.messages()
        assert message.count(b"b" * 76 + b"\n") == 27_000  # all of it
        assert wait_for(lambda: queued(srv) == [])
        assert srv.messages(ALICE) == []
    finally:
        srv.stop()


def test_kill_9_while_a_message_is_on_the_wire(
    tmp_path: Path, dns: Dnsmasq, port: int, peers: list[Any]
) -> None:
    stalled = FaultyMta(MX1, port, "stall", hold=60).start()
    peers.append(stalled)
    srv = relay_server(tmp_path, dns.server, port)
    send(srv, "bob@remote.test", "tag-killed", BIG)
    assert wait_for(lambda: len(stalled.octets) == 1)
    srv.kill()
    stalled.stop()
    assert len(queued(srv)) == 1
    good = SmtpSink(tmp_path, MX1, port, name="good").start()
    peers.append(good)
    srv.start()
    try:
        assert wait_for(lambda: delivered_once(good, "tag-killed"), 30)
        assert wait_for(lambda: queued(srv) == [])
        (message,) = good.messages()
        assert message.count(b"b" * 76 + b"\n") == 27_000
        assert srv.messages(ALICE) == []
    finally:
        srv.stop()


def switch_dns(srv: PostofficeServer, old: str, new: str) -> None:
    text = srv.config.read_text()
    assert old in text
    srv.config.write_text(text.replace(old, new))


def test_dns_servfail_defers_and_does_not_bounce(
    tmp_path: Path, dns: Dnsmasq, port: int, peers: list[Any]
) -> None:
    failing = ServfailDns().start()
    good = SmtpSink(tmp_path, MX1, port).start()
    peers += [failing, good]
    srv = relay_server(tmp_path, failing.server, port)
    try:
        send(srv, "bob@remote.test", "tag-servfail")
        assert wait_for(lambda: deferrals(srv, "bob@remote.test") >= 2)
        assert failing.queries >= 2
        assert_deferred_not_bounced(srv, "bob@remote.test")
    finally:
        srv.stop()
    switch_dns(srv, failing.server, dns.server)  # DNS is well again
    srv.start()
    try:
        assert wait_for(lambda: delivered_once(good, "tag-servfail"))
        assert wait_for(lambda: queued(srv) == [])
        assert srv.messages(ALICE) == []
    finally:
        srv.stop()


def test_dns_timeout_defers_and_does_not_bounce(
    tmp_path: Path, dns: Dnsmasq, port: int, peers: list[Any]
) -> None:
    import socket

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # receives queries, never answers
    silent_server = f"127.0.0.1:{silent.getsockname()[1]}"
    good = SmtpSink(tmp_path, MX1, port).start()
    peers.append(good)
    srv = relay_server(tmp_path, silent_server, port)
    try:
        send(srv, "bob@remote.test", "tag-timeout")
        assert wait_for(lambda: deferrals(srv, "bob@remote.test") >= 1, 60)
        assert "timeout" in srv.log().lower()
        assert_deferred_not_bounced(srv, "bob@remote.test")
    finally:
        srv.stop()
        silent.close()
    switch_dns(srv, silent_server, dns.server)
    srv.start()
    try:
        assert wait_for(lambda: delivered_once(good, "tag-timeout"))
        assert wait_for(lambda: queued(srv) == [])
    finally:
        srv.stop()
