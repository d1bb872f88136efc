"""Two postoffice nodes on one PostgreSQL: accounts made with the CLI against
one node's config log in on the other within a second; the embedded
default is untouched by any of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.cluster import ALICE, ALICE_PW, PROPAGATION, first_success, pop3_login
from tests.support.server import PostofficeServer


def test_a_user_added_on_node_1_logs_in_on_node_2_within_a_second(
    two_nodes: tuple[PostofficeServer, ...],
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


def test_an_account_added_on_node_3_logs_in_on_nodes_1_and_2_within_a_second(
    three_nodes: tuple[PostofficeServer, ...],
) -> None:
    node1, node2, node3 = three_nodes
    node3.add_user(ALICE, ALICE_PW)
    for node in (node1, node2):
        took = first_success(lambda n=node: pop3_login(n, ALICE, ALICE_PW), PROPAGATION)
        assert took is not None, f"{node.root.name} did not accept the account within 1 s"


def test_a_password_change_on_node_2_reaches_node_1(
    two_nodes: tuple[PostofficeServer, ...],
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
    two_nodes: tuple[PostofficeServer, ...],
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
