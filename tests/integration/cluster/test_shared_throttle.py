"""The login throttle across nodes: wrong passwords spread over two nodes
(POP3 on one, IMAP on the other) spend the account's failure budget as they
would on one node (cluster/throttle_feed.py)."""

from __future__ import annotations

import imaplib
import poplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import ALICE, ALICE_PW
from tests.support.helpers import wait_for
from tests.support.postgres import PostgresServer
from tests.support.server import PostofficeServer

BUDGET = 6  # [auth] throttle_account_failures
RECOVERY = 15.0  # seconds: the feed's reconnect backoff is at most 10 s
BACK = "postoffice.cluster.throttle: [cluster] database reachable again"


@pytest.fixture
def nodes(tmp_path: Path, pg_url: str) -> Iterator[tuple[PostofficeServer, PostofficeServer]]:
    sections = {
        "cluster": {"database": pg_url},
        "auth": {
            "allow_plaintext_loopback": True,
            "throttle_after": 1000,  # the pair penalty out of the way: budgets only
            "throttle_account_failures": BUDGET,
            "throttle_window": 3600,  # a spent budget frees a slot per 600 s: refused
            "throttle_max_delay": 5,
        },
    }
    node1 = PostofficeServer(tmp_path / "node1", sections=sections)
    node2 = PostofficeServer(tmp_path / "node2", sections=sections)
    try:
        node1.start()
        node2.start()
        yield node1, node2
    finally:
        node1.stop()
        node2.stop()


def pop3(node: PostofficeServer, password: str) -> str:
    """ "+OK", or the -ERR line's response code ("[AUTH]", "[SYS/TEMP]")."""
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    try:
        client.user(ALICE)
        client.pass_(password)
        return "+OK"
    except poplib.error_proto as exc:
        return str(exc.args[0], "ascii", "replace").split()[1]
    finally:
        client.quit() if client.sock else None


def imap(node: PostofficeServer, password: str) -> str:
    """ "OK", or the NO's response code ("[AUTHENTICATIONFAILED]", "[UNAVAILABLE]")."""
    client = imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=15)
    try:
        client.login(ALICE, password)
        return "OK"
    except imaplib.IMAP4.error as exc:
        return str(exc).split()[0].lstrip("b'\"")
    finally:
        client.shutdown()


def test_wrong_passwords_over_two_nodes_are_throttled_as_on_one(
    nodes: tuple[PostofficeServer, PostofficeServer],
) -> None:
    node1, node2 = nodes
    node1.add_user(ALICE, ALICE_PW)
    # Half the budget on each node, over both protocols: neither alone is spent.
    # Each a new guess: a repeated wrong password is not counted again.
    for i in range(BUDGET // 2):
        assert pop3(node1, f"wrong-{i}") == "[AUTH]"
        assert imap(node2, f"wrong-imap-{i}") == "[AUTHENTICATIONFAILED]"
    time.sleep(0.5)  # NOTIFY takes milliseconds; a loaded machine gets leeway
    # Even the right password is not checked now, on either node (not
    # known-good: it never logged in).
    assert pop3(node1, ALICE_PW) == "[SYS/TEMP]"
    assert imap(node2, ALICE_PW) == "[UNAVAILABLE]"
    assert "auth throttle: account budget spent" in node1.log() + node2.log()


def test_under_the_budget_logins_go_on(
    nodes: tuple[PostofficeServer, PostofficeServer],
) -> None:
    """The control: fewer failures than the budget over both nodes refuse nothing."""
    node1, node2 = nodes
    node1.add_user(ALICE, ALICE_PW)
    for i in range(BUDGET // 2 - 1):
        assert pop3(node1, f"wrong-{i}") == "[AUTH]"
        assert imap(node2, f"wrong-imap-{i}") == "[AUTHENTICATIONFAILED]"
    time.sleep(0.5)
    assert pop3(node1, ALICE_PW) == "+OK"
    assert imap(node2, ALICE_PW) == "OK"


def test_sharing_resumes_after_a_postgresql_restart(
    nodes: tuple[PostofficeServer, PostofficeServer], postgres: PostgresServer
) -> None:
    node1, node2 = nodes
    node1.add_user(ALICE, ALICE_PW)
    postgres.halt()
    try:
        # IMAP logins need no database: judged, and counted, on node 1 alone.
        for i in range(BUDGET // 2):
            assert imap(node1, f"wrong-{i}") == "[AUTHENTICATIONFAILED]"
    finally:
        postgres.resume()
    assert wait_for(lambda: BACK in node1.log() and BACK in node2.log(), RECOVERY), node1.log()
    # Both feeds listen again: node 2's failures reach node 1, on top of its own.
    for i in range(BUDGET // 2):
        assert imap(node2, f"wrong-2-{i}") == "[AUTHENTICATIONFAILED]"
    time.sleep(0.5)
    assert imap(node1, ALICE_PW) == "[UNAVAILABLE]"
    assert "postoffice.cluster.throttle: lost the [cluster] database" in node1.log()
