"""Two postoffice nodes on one PostgreSQL: accounts made with the CLI against
one node's config log in on the other within a second; the embedded
default is untouched by any of it."""

from __future__ import annotations

import poplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.server import PostofficeServer

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
PROPAGATION = 1.0  # issue 17: a change on one node is in force on all within 1 s


@pytest.fixture
def two_nodes(tmp_path: Path, pg_url: str) -> Iterator[tuple[PostofficeServer, PostofficeServer]]:
    sections = {
        "cluster": {"database": pg_url},
        # Plain USER/PASS from loopback; a login polled before the account
        # reached the node must not slow the next one down.
        "auth": {"allow_plaintext_loopback": True, "throttle_after": 1000},
    }
    nodes = (
        PostofficeServer(tmp_path / "node1", sections=sections),
        PostofficeServer(tmp_path / "node2", sections=sections),
    )
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def pop3_login(node: PostofficeServer, user: str, password: str) -> bool:
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    try:
        client.user(user)
        client.pass_(password)
        return True
    except poplib.error_proto:
        return False
    finally:
        client.quit() if client.sock else None


def first_success(attempt: Callable[[], bool], seconds: float) -> float | None:
    """Seconds from now until an attempt that started then succeeded; None if
    none did within ``seconds``.  Bounded: at most 50 attempts."""
    start = time.monotonic()
    for _ in range(50):
        began = time.monotonic() - start
        if began > seconds:
            return None
        if attempt():
            return began
        time.sleep(0.05)
    return None


def test_a_user_added_on_node_1_logs_in_on_node_2_within_a_second(
    two_nodes: tuple[PostofficeServer, PostofficeServer],
) -> None:
    node1, node2 = two_nodes
    assert not pop3_login(node2, ALICE, ALICE_PW)
    node1.add_user(ALICE, ALICE_PW)  # the CLI, with node 1's config
    took = first_success(lambda: pop3_login(node2, ALICE, ALICE_PW), PROPAGATION)
    assert took is not None, "node 2 did not accept the new account within 1 s"
    assert pop3_login(node1, ALICE, ALICE_PW)
    assert "alice@example.test" in node2.cli("user", "list").stdout
    # Neither node keeps accounts in its data dir.
    assert not (node1.data_dir / "accounts.sqlite3").exists()
    assert not (node2.data_dir / "accounts.sqlite3").exists()


def test_a_password_change_on_node_2_reaches_node_1(
    two_nodes: tuple[PostofficeServer, PostofficeServer],
) -> None:
    node1, node2 = two_nodes
    node1.add_user(ALICE, ALICE_PW)
    assert first_success(lambda: pop3_login(node1, ALICE, ALICE_PW), PROPAGATION) is not None
    node2.cli("user", "passwd", ALICE, "--password-stdin", input="changed-password-2\n")
    took = first_success(lambda: pop3_login(node1, ALICE, "changed-password-2"), PROPAGATION)
    assert took is not None, "node 1 did not take the new password within 1 s"
    assert not pop3_login(node1, ALICE, ALICE_PW)
    node1.cli("user", "remove", ALICE)
    assert first_success(lambda: not pop3_login(node2, ALICE, "changed-password-2"), PROPAGATION)


def test_check_reports_the_cluster_accounts(
    two_nodes: tuple[PostofficeServer, PostofficeServer],
) -> None:
    node1, _node2 = two_nodes
    node1.add_user(ALICE, ALICE_PW)
    out = node1.cli("check").stdout
    assert "accounts in the [cluster] database: 1 user(s)" in out


def test_an_unreachable_database_is_refused_by_the_cli(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    node = PostofficeServer(
        tmp_path,
        sections={"cluster": {"database": f"postgresql://x@127.0.0.1:{free_port()}/none"}},
    )
    node.data_dir.mkdir(parents=True, exist_ok=True)
    result = node.cli("user", "list", check=False)
    assert result.returncode != 0
    assert "cannot connect to the [cluster] database" in result.stderr


def test_the_embedded_default_is_unchanged(tmp_path: Path) -> None:
    node = PostofficeServer(tmp_path, sections={"auth": {"allow_plaintext_loopback": True}})
    node.add_user(ALICE, ALICE_PW)
    assert (node.data_dir / "accounts.sqlite3").is_file()
    node.start()
    try:
        assert pop3_login(node, ALICE, ALICE_PW)
    finally:
        node.stop()
    # Without [cluster] the PostgreSQL driver is never even imported.
    probe = (
        "import sys, postoffice.app, postoffice.cli, postoffice.check;"
        "from postoffice.cluster.stores import open_accounts;"
        "from postoffice.config.settings import load_settings;"
        f"open_accounts(load_settings(__import__('pathlib').Path({str(node.config)!r})),"
        " follow=True).close();"
        "print('psycopg' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"
