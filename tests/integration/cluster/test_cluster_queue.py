"""The outbound queue shared by [cluster] nodes (docs/cluster.md, "The
outbound queue"): mail accepted on one node is delivered by another after
the first is killed -9, never twice within a lease, and ``queue list`` on
any node shows the shared queue.

Real parts: PostgreSQL (tests/support/postgres.py), postoffice nodes as
processes, and a scripted MTA on loopback as every node's smarthost.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from postoffice.delivery.queue.pg_store import PgQueueStore
from postoffice.mail.address import Address
from tests.support.cluster import ALICE, ALICE_PW
from tests.support.helpers import wait_for
from tests.support.peers import ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

LEASE = 4.0  # seconds: [cluster] queue_lease for these nodes
REMOTE = "bob@remote.test"


@pytest.fixture
def peer() -> Iterator[ScriptedMta]:
    mta = ScriptedMta("127.0.0.1", free_port()).start()
    yield mta
    mta.stop()


def make_nodes(
    tmp_path: Path, pg_url: str, peer: ScriptedMta, count: int, retry: float = 1
) -> list[PostofficeServer]:
    sections = {
        "cluster": {"database": pg_url, "queue_lease": LEASE},
        "relay": {
            "smarthost": f"127.0.0.1:{peer.port}",
            "retry_schedule": [retry],
            "connect_timeout": 5,
        },
    }
    return [PostofficeServer(tmp_path / f"node{i}", sections=sections) for i in range(1, count + 1)]


def submit(node: PostofficeServer, subject: str, body: str = "Hello.\r\n") -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=15) as client:
        client.starttls(context=ctx)
        client.login(ALICE, ALICE_PW)
        msg = f"From: <{ALICE}>\r\nTo: <{REMOTE}>\r\nSubject: {subject}\r\n\r\n{body}"
        client.sendmail(ALICE, [REMOTE], msg.encode())


def mail_froms(peer: ScriptedMta) -> int:
    return sum(1 for c in peer.commands if c.upper().startswith("MAIL FROM"))


def delivered_lines(node: PostofficeServer) -> list[str]:
    return [line for line in node.log().splitlines() if re.search(r"\bresult=delivered\b", line)]


def test_a_node_killed_mid_delivery_leaves_the_message_to_another_after_the_lease(
    tmp_path: Path, pg_url: str, peer: ScriptedMta
) -> None:
    node1, node2 = make_nodes(tmp_path, pg_url, peer, 2)
    try:
        node1.start()
        node1.add_user(ALICE, ALICE_PW)
        # The smarthost takes the message but does not answer its end: node 1
        # is stuck mid-delivery, holding its claim (and renewing it).
        peer.data_delay = 60.0
        submit(node1, "failover")
        assert wait_for(lambda: mail_froms(peer) == 1, 10), node1.log()
        node2.start()
        listed = node2.cli("queue", "list").stdout
        assert REMOTE in listed and "1 message(s) in the [cluster] queue" in listed
        assert "being delivered by" in listed
        # Two leases and more: node 1 renews its claim, node 2 must not touch
        # the message (without renewal node 2 would have sent it by now).
        time.sleep(LEASE * 2.5)
        assert mail_froms(peer) == 1, "a second node sent while the first held the lease"
        assert peer.received == []

        peer.data_delay = 0.0
        node1.kill()
        killed = time.monotonic()
        assert wait_for(lambda: len(peer.received) == 1, LEASE + 10), node2.log()
        took = time.monotonic() - killed
        assert took < LEASE + 5, f"took {took:.1f} s after the kill"
        assert "taken over from node" in node2.log()
        assert len(delivered_lines(node2)) == 1
        assert peer.received[0].recipients == [f"<{REMOTE}>"]
        assert b"Subject: failover" in peer.received[0].data
        # Finished: gone from the shared queue, and not sent again.
        assert wait_for(
            lambda: "0 message(s) in the [cluster] queue" in node2.cli("queue", "list").stdout, 10
        )
        time.sleep(1.5)
        assert len(peer.received) == 1
        assert mail_froms(peer) == 2
        # The node's own data dir holds no queue.
        assert not (node1.data_dir / "queue").exists()
    finally:
        for node in (node1, node2):
            node.stop()


def test_mail_accepted_while_the_smarthost_is_down_is_delivered_by_another_node(
    tmp_path: Path, pg_url: str
) -> None:
    port = free_port()
    down = ScriptedMta("127.0.0.1", port)  # not started: down at first
    node1, node2 = make_nodes(tmp_path, pg_url, down, 2)
    try:
        node1.start()
        node1.add_user(ALICE, ALICE_PW)
        # Large: it is stored as several chunks, streamed in and out.
        lines = [f"line {i:06d} " + "x" * 60 for i in range(5000)]
        submit(node1, "deferred", "\r\n".join(lines) + "\r\n")
        assert wait_for(lambda: "result=deferred" in node1.log(), 10), node1.log()
        node1.kill()
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT count(*), sum(length(data)) FROM queue_bodies").fetchone()
        assert row is not None and row[0] > 4 and row[1] > 5000 * 70
        up = ScriptedMta("127.0.0.1", port).start()
        try:
            node2.start()
            assert wait_for(lambda: len(up.received) == 1, 15), node2.log()
            data = up.received[0].data
            assert data.endswith(("\r\n".join(lines) + "\r\n").encode()), "body changed"
            assert len(delivered_lines(node2)) == 1
            listed = node2.cli("queue", "list").stdout
            assert wait_for(lambda: "0 message(s)" in node2.cli("queue", "list").stdout, 10), listed
            time.sleep(1.5)
            assert len(up.received) == 1
        finally:
            up.stop()
    finally:
        for node in (node1, node2):
            node.stop()


def test_queue_commands_act_on_the_shared_queue(tmp_path: Path, pg_url: str) -> None:
    """`queue list|flush|remove` with [cluster]: the database's queue, from
    any node's config, whether or not a node runs."""
    node = make_nodes(tmp_path, pg_url, ScriptedMta("127.0.0.1", free_port()), 1)[0]
    with ThreadPoolExecutor(max_workers=2) as pool:
        store = PgQueueStore(pg_url, "elsewhere", pool)
        try:

            async def queue() -> str:
                writer = store.writer(
                    Address("alice", "example.test"), [Address("bob", "remote.test")]
                )
                await writer.write(b"Subject: shared\n\nhello\n")
                return await writer.commit()

            queue_id = asyncio.run(queue())
        finally:
            store.close()
    listed = node.cli("queue", "list").stdout
    assert queue_id in listed and "queued    <bob@remote.test>" in listed
    assert "1 message(s) in the [cluster] queue" in listed
    assert "1 message(s) due now" in node.cli("queue", "flush").stdout
    assert node.cli("queue", "remove", queue_id).stdout.strip() == f"{queue_id}: removed"
    gone = node.cli("queue", "remove", queue_id, check=False)
    assert gone.returncode == 1 and "no message" in gone.stderr
    assert "0 message(s) in the [cluster] queue" in node.cli("queue", "list").stdout
    assert not (node.data_dir / "queue").exists()


def test_queue_flush_retries_a_deferred_message_now(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    down = ScriptedMta("127.0.0.1", port)  # not started: down at first
    [node] = make_nodes(tmp_path, pg_url, down, 1, retry=3600)
    try:
        node.start()
        node.add_user(ALICE, ALICE_PW)
        submit(node, "flushed")
        assert wait_for(lambda: "result=deferred" in node.log(), 10), node.log()
        up = ScriptedMta("127.0.0.1", port).start()
        try:
            time.sleep(2.5)  # the retry schedule says an hour: nothing happens
            assert up.received == []
            node.cli("queue", "flush")
            assert wait_for(lambda: len(up.received) == 1, 10), node.log()
        finally:
            up.stop()
    finally:
        node.stop()
