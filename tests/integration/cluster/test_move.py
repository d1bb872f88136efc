"""``postoffice cluster migrate`` / ``export`` with the real CLI and a real
PostgreSQL: accounts both ways, resumable, verified, never overwriting."""

from __future__ import annotations

from pathlib import Path

from postoffice.cluster.accounts import PostgresAccountStore
from postoffice.mail.address import Address
from postoffice.storage.sqlite_accounts import SqliteAccountStore
from tests.support.cluster import ALICE, ALICE_PW, pop3_login
from tests.support.server import PostofficeServer

BOB = "bob@other.test"
DOMAINS = ["example.test"]  # the config file's


def everything(store: SqliteAccountStore) -> tuple[object, ...]:
    users = store.list_users()
    return (
        store.list_domains(),
        [(u, store.password_hash(u), store.quota(u), store.is_admin(u)) for u in users],
        store.list_aliases(),
    )


def with_cluster(node: PostofficeServer, pg_url: str) -> None:
    node.config.write_text(node.config.read_text() + f'\n[cluster]\ndatabase = "{pg_url}"\n')


def test_migrate_and_export_round_trip(tmp_path: Path, pg_url: str) -> None:
    auth = {"auth": {"allow_plaintext_loopback": True}}
    embedded = PostofficeServer(tmp_path / "embedded", sections=auth)
    embedded.cli("domain", "add", "other.test")
    embedded.add_user(ALICE, ALICE_PW)
    embedded.add_user(BOB, "bob-password-2")
    embedded.cli("user", "quota", ALICE, "5M")
    embedded.cli("user", "admin", ALICE)  # the admin flag moves too
    # Twelve targets: their order survives (position 10 sorts after 9).
    remote = [f"r{i}@remote.test" for i in range(12)]
    embedded.cli("alias", "add", "team@example.test", ALICE, *remote)
    embedded.cli("alias", "add", "@other.test", BOB)
    source = SqliteAccountStore(embedded.data_dir / "accounts.sqlite3", DOMAINS)
    try:
        before = everything(source)
    finally:
        source.close()

    with_cluster(embedded, pg_url)
    out = embedded.cli("cluster", "migrate").stdout
    assert "users: 2 in the source, 2 copied, 0 there already; verified" in out
    assert "aliases: 2 in the source, 2 copied" in out
    assert "domains: 1 in the source, 1 copied" in out
    pg = PostgresAccountStore(pg_url, DOMAINS)
    try:
        assert everything(pg) == before
    finally:
        pg.close()
    # Run again (as after an interruption): nothing left to copy.
    again = embedded.cli("cluster", "migrate").stdout
    assert "users: 2 in the source, 0 copied, 2 there already" in again

    # A cluster node serves the migrated accounts.
    node = PostofficeServer(tmp_path / "node", sections={**auth, "cluster": {"database": pg_url}})
    node.start()
    try:
        assert pop3_login(node, ALICE, ALICE_PW)
    finally:
        node.stop()

    # And back out, into a fresh data dir.
    fresh = PostofficeServer(tmp_path / "fresh", sections=auth)
    with_cluster(fresh, pg_url)
    out = fresh.cli("cluster", "export").stdout
    assert "users: 2 in the source, 2 copied" in out
    back = SqliteAccountStore(fresh.data_dir / "accounts.sqlite3", DOMAINS)
    try:
        assert everything(back) == before
    finally:
        back.close()


def test_an_entry_that_differs_stops_the_copy(tmp_path: Path, pg_url: str) -> None:
    embedded = PostofficeServer(tmp_path / "embedded")
    embedded.add_user(ALICE, ALICE_PW)
    embedded.add_user("carol@example.test", "carol-password-3")
    pg = PostgresAccountStore(pg_url, DOMAINS)
    try:
        pg.add_user(Address("alice", "example.test"), "another-hash")
        with_cluster(embedded, pg_url)
        result = embedded.cli("cluster", "migrate", check=False)
        assert result.returncode != 0
        assert "users: alice@example.test differ(s) on the receiving side" in result.stderr
        # Nothing copied, nothing overwritten.
        assert pg.list_users() == [Address("alice", "example.test")]
        assert pg.password_hash(Address("alice", "example.test")) == "another-hash"
    finally:
        pg.close()


def test_the_commands_need_a_cluster_database(tmp_path: Path) -> None:
    embedded = PostofficeServer(tmp_path)
    embedded.add_user(ALICE, ALICE_PW)
    for command in ("migrate", "export"):
        result = embedded.cli("cluster", command, check=False)
        assert result.returncode != 0
        assert "no [cluster] database" in result.stderr


def test_dkim_keys_move_both_ways_with_rotations_and_refusals(tmp_path: Path, pg_url: str) -> None:
    from postoffice.cluster.dkim_keys import load_keys
    from postoffice.policy.dkim_keys import all_keys, txt_record
    from postoffice.policy.dkim_keys import load_keys as load_file_keys

    embedded = PostofficeServer(tmp_path / "embedded")
    embedded.add_user(ALICE, ALICE_PW)
    embedded.cli("dkim", "generate", "example.test")
    embedded.cli("dkim", "generate", "--rotate", "example.test")  # old selectors kept, inactive
    before = all_keys(embedded.data_dir)
    shown = embedded.cli("dkim", "show", "example.test").stdout

    with_cluster(embedded, pg_url)
    out = embedded.cli("cluster", "migrate").stdout
    assert "dkim_keys: 1 in the source, 1 copied, 0 there already; verified" in out
    # The cluster CLI shows the same active keys (the same records to publish).
    assert embedded.cli("dkim", "show", "example.test").stdout == shown
    again = embedded.cli("cluster", "migrate").stdout
    assert "dkim_keys: 1 in the source, 0 copied, 1 there already" in again
    # A rotation in the database only: the copy back refuses the domain, whole.
    embedded.cli("dkim", "generate", "--rotate", "example.test")
    refused = embedded.cli("cluster", "migrate", check=False)
    assert refused.returncode != 0
    assert "example.test differ(s) on the receiving side" in refused.stderr

    fresh = PostofficeServer(tmp_path / "fresh")
    with_cluster(fresh, pg_url)
    out = fresh.cli("cluster", "export").stdout
    assert "dkim_keys: 1 in the source, 1 copied" in out
    back = all_keys(fresh.data_dir)
    assert len(back["example.test"]) == 6  # three rotations' worth, two active
    assert {k.selector for k in back["example.test"]} >= {
        k.selector for k in before["example.test"]
    }
    assert sum(k.active for k in back["example.test"]) == 2
    # The exported data dir's active keys are the database's.
    exported = [txt_record(k) for k in load_file_keys(fresh.data_dir, "example.test")]
    assert exported == [txt_record(k) for k in load_keys(pg_url, "example.test")]
    for path in (fresh.data_dir / "dkim" / "example.test").glob("*.pem"):
        assert path.stat().st_mode & 0o077 == 0
