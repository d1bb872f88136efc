"""The POP3 maildrop lock across nodes: a PostgreSQL advisory lock, so a
session on one node makes the other answer [IN-USE] (RFC 2449 §8.1.1), and
a node killed with -9 leaves nothing locked."""

from __future__ import annotations

import poplib

import psycopg
import pytest

from tests.support.cluster import ALICE, ALICE_PW, PROPAGATION, first_success, pop3_login
from tests.support.server import PostofficeServer


def logged_in(node: PostofficeServer) -> poplib.POP3:
    """A POP3 session in TRANSACTION state (holding the maildrop)."""
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    client.user(ALICE)
    client.pass_(ALICE_PW)
    return client


def refused_in_use(node: PostofficeServer) -> None:
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    try:
        client.user(ALICE)
        with pytest.raises(poplib.error_proto) as info:
            client.pass_(ALICE_PW)
        assert info.value.args[0].startswith(b"-ERR [IN-USE]")
    finally:
        client.quit()


def test_a_session_on_one_node_locks_the_maildrop_on_the_other(
    two_nodes: tuple[PostofficeServer, ...],
) -> None:
    node1, node2 = two_nodes
    node1.add_user(ALICE, ALICE_PW)
    assert first_success(lambda: pop3_login(node2, ALICE, ALICE_PW), PROPAGATION) is not None
    holder = logged_in(node1)
    try:
        refused_in_use(node2)
        refused_in_use(node1)  # the node's own flock, as without [cluster]
    finally:
        holder.quit()
    # Unlocked at QUIT (the unlock is sent from a thread: moments later).
    assert first_success(lambda: pop3_login(node2, ALICE, ALICE_PW), 1.0) is not None
    holder = logged_in(node2)
    try:
        refused_in_use(node1)
    finally:
        holder.quit()


def test_a_killed_node_leaves_nothing_locked(
    two_nodes: tuple[PostofficeServer, ...],
) -> None:
    node1, node2 = two_nodes
    node1.add_user(ALICE, ALICE_PW)
    assert first_success(lambda: pop3_login(node1, ALICE, ALICE_PW), PROPAGATION) is not None
    holder = logged_in(node1)
    refused_in_use(node2)
    node1.kill()  # SIGKILL: no QUIT, no unlock; PostgreSQL ends its session
    holder.close()
    assert first_success(lambda: pop3_login(node2, ALICE, ALICE_PW), 5.0) is not None


def test_update_changes_nothing_once_the_lock_is_lost(
    two_nodes: tuple[PostofficeServer, ...], pg_url: str
) -> None:
    node1, _node2 = two_nodes
    node1.add_user(ALICE, ALICE_PW)
    assert first_success(lambda: pop3_login(node1, ALICE, ALICE_PW), PROPAGATION) is not None
    new = node1.maildir(ALICE) / "new"
    (new / "1700000000.M1P1.test").write_bytes(b"Subject: keep me\n\nbody\n")
    holder = logged_in(node1)
    try:
        holder.dele(1)
        # The connection holding the advisory lock ends (a PostgreSQL restart,
        # a network cut): the lock is gone, and another node could take over.
        with psycopg.connect(pg_url, autocommit=True) as conn:
            ended = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
        assert ended == [(True,)]
        with pytest.raises(poplib.error_proto) as info:
            holder.quit()
        assert info.value.args[0].startswith(b"-ERR [SYS/TEMP]")
    finally:
        holder.close()
    assert [p.name for p in new.iterdir()] == ["1700000000.M1P1.test"]
