"""PostgresAccountStore against a real PostgreSQL: the embedded store's own
contract tests, run again on it, then what only a shared database has
(NOTIFY to another node's store, migration, serialised writers, outages)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from postoffice.cluster import accounts as pg_accounts
from postoffice.cluster.accounts import PostgresAccountStore
from postoffice.storage.accounts import AccountError
from tests.support.postgres import PostgresServer

# The embedded store's tests that need only a `store` (or `populated`)
# fixture: collected here too, so both stores are held to the same rules.
from tests.unit.storage.test_sqlite_accounts import (  # noqa: F401
    HASH,
    A,
    populated,
    test_add_alias_refusals,
    test_add_domain_refusals,
    test_add_domain_twice,
    test_add_user_refusals,
    test_admin_flag_per_user,
    test_alias_depth_limit,
    test_alias_loops_are_refused,
    test_alias_names_are_account_names,
    test_alias_targets_keep_order_and_drop_duplicates,
    test_aliases,
    test_app_passwords_per_user,
    test_catch_all_is_per_domain,
    test_domains,
    test_is_an_account_store,
    test_nested_aliases_expand_recursively,
    test_password_hash_of_non_account_names_is_none,
    test_plus_prefers_user_then_alias,
    test_postmaster_is_per_domain,
    test_quota_per_user,
    test_remote_target_with_quoted_local_part_round_trips,
    test_remove_domain_refusals,
    test_remove_user_named_by_aliases,
    test_resolve_alias_to_users_and_forwards,
    test_resolve_catch_all_is_last,
    test_resolve_non_local_domain_is_none,
    test_resolve_plus_addressing,
    test_resolve_unknown_user_is_empty,
    test_resolve_user_case_insensitively,
    test_set_password_and_remove_unknown_user,
    test_target_domain_locality_is_decided_at_resolve_time,
    test_unknown_local_targets_are_dropped,
    test_users,
    test_wire_only_local_parts_never_match_or_relay,
)

ALICE = A("alice", "example.test")
PROPAGATION = 1.0  # seconds: issue 17's bound for a change to reach every node


@pytest.fixture(params=["cli", "node"])
def store(request: pytest.FixtureRequest, pg_url: str) -> Iterator[PostgresAccountStore]:
    """Both ways of reading: afresh per call (the CLI), and from the snapshot a
    listener keeps (a server node)."""
    s = PostgresAccountStore(pg_url, ["example.test"], follow=request.param == "node")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def nodes(pg_url: str) -> Iterator[Callable[[], PostgresAccountStore]]:
    """Opens more stores on the same database (as server nodes), closed after."""
    opened: list[PostgresAccountStore] = []

    def node() -> PostgresAccountStore:
        opened.append(PostgresAccountStore(pg_url, ["example.test"], follow=True))
        assert opened[-1].listening.wait(10)
        return opened[-1]

    try:
        yield node
    finally:
        for s in opened:
            s.close()


def within(predicate: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``predicate`` held (polled every 10 ms), None if it never did."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def test_a_change_on_one_node_reaches_the_others_within_a_second(
    nodes: Callable[[], PostgresAccountStore],
) -> None:
    one, two, three = nodes(), nodes(), nodes()
    one.add_user(ALICE, HASH)
    assert one.password_hash(ALICE) == HASH  # the writer at once
    for other in (two, three):
        assert within(lambda o=other: o.password_hash(ALICE) == HASH, PROPAGATION) is not None
    two.set_password(ALICE, "new-hash")
    for other in (one, three):
        assert within(lambda o=other: o.password_hash(ALICE) == "new-hash", PROPAGATION)
    three.set_quota(ALICE, 1000)
    three.add_domain("other.test")
    three.add_alias("team@example.test", [ALICE])
    assert within(
        lambda: (
            one.quota(ALICE) == 1000
            and one.is_local_domain("other.test")
            and one.list_aliases() == {"team@example.test": (ALICE,)}
        ),
        PROPAGATION,
    )
    one.remove_alias("team@example.test")
    one.remove_user(ALICE)
    assert within(lambda: two.password_hash(ALICE) is None, PROPAGATION)


def test_a_node_reads_from_memory_not_the_database(
    nodes: Callable[[], PostgresAccountStore], pg_url: str
) -> None:
    node = nodes()
    node.add_user(ALICE, HASH)
    # A row changed behind the stores' back (no NOTIFY, no version bump) is
    # not seen: lookups never query the database.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE users SET password_hash = 'sneaky'")
    time.sleep(0.2)
    assert node.password_hash(ALICE) == HASH


def test_a_lost_notification_is_made_good_by_the_version_check(
    nodes: Callable[[], PostgresAccountStore], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_accounts, "RESYNC_SECONDS", 0.3)
    node = nodes()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a writer that sends no NOTIFY
        conn.execute("INSERT INTO domains (name) VALUES ('quiet.test')")
        conn.execute("UPDATE accounts_version SET n = n + 1")
    assert within(lambda: node.is_local_domain("quiet.test"), 3.0)


def test_schema_is_versioned_and_a_newer_one_refused(pg_url: str) -> None:
    PostgresAccountStore(pg_url).close()
    PostgresAccountStore(pg_url).close()  # opening again migrates nothing
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT version FROM postoffice_schema WHERE component = 'accounts'"
        ).fetchone()
        assert row == (len(pg_accounts.MIGRATIONS),)
        conn.execute("UPDATE postoffice_schema SET version = version + 1")
    with pytest.raises(AccountError, match="newer release"):
        PostgresAccountStore(pg_url)


def test_nodes_starting_together_migrate_once(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            PostgresAccountStore(pg_url).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_racing_writers_are_serialised(pg_url: str) -> None:
    stores = [PostgresAccountStore(pg_url, ["example.test"]) for _ in range(4)]
    try:
        stores[0].add_user(ALICE, HASH)
        results: list[str] = []

        def add(s: PostgresAccountStore) -> None:
            try:
                s.add_alias("team@example.test", [ALICE])
                results.append("added")
            except AccountError as exc:
                results.append(str(exc))

        threads = [threading.Thread(target=add, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results.count("added") == 1
        assert sum("exists already" in r for r in results) == 3
    finally:
        for s in stores:
            s.close()


def test_unreachable_database_is_an_account_error(postgres: PostgresServer) -> None:
    from tests.support.ports import free_port

    with pytest.raises(AccountError, match="cannot connect"):
        PostgresAccountStore(f"postgresql://postoffice@127.0.0.1:{free_port()}/x")


def test_a_node_keeps_its_snapshot_while_the_database_is_gone(
    nodes: Callable[[], PostgresAccountStore], pg_url: str, postgres: PostgresServer
) -> None:
    node = nodes()
    node.add_user(ALICE, HASH)
    name = pg_url.rpartition("/")[2]
    # Every session of this database ended, as a restart of PostgreSQL would.
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    assert node.password_hash(ALICE) == HASH
    # Back: it listens again, and a change made meanwhile is read.
    other = PostgresAccountStore(pg_url, ["example.test"])
    try:
        other.set_password(ALICE, "after")
    finally:
        other.close()
    assert within(lambda: node.password_hash(ALICE) == "after", 5.0)
