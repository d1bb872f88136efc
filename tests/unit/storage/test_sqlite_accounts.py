"""SqliteAccountStore: every method, the resolve order, and cross-process visibility."""

from __future__ import annotations

import itertools
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.mail.address import Address, parse_mailbox
from postoffice.storage.accounts import MAX_APP_PASSWORDS, AccountError, AccountStore, Resolution
from postoffice.storage.sqlite_accounts import MAX_ALIAS_DEPTH, SCHEMA_VERSION, SqliteAccountStore

A = Address
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "accounts.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[SqliteAccountStore]:
    s = SqliteAccountStore(db, config_domains=["example.test"])
    try:
        yield s
    finally:
        s.close()


def mailboxes(*addrs: str) -> Resolution:
    return Resolution(mailboxes=tuple(parse_mailbox(a) for a in addrs))


def test_is_an_account_store(store: SqliteAccountStore) -> None:
    accounts: AccountStore = store  # mypy checks the Protocol; this checks it runs
    assert accounts.list_users() == []


# --- opening -------------------------------------------------------------------------


def test_creates_private_wal_database_with_schema_version(db: Path) -> None:
    SqliteAccountStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_refuses_a_newer_schema(db: Path) -> None:
    SqliteAccountStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(AccountError, match="schema version"):
        SqliteAccountStore(db)


def test_unopenable_database_is_an_account_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "accounts.sqlite3"
    not_a_db.write_bytes(b"this is not a database, just text" * 100)
    with pytest.raises(AccountError, match="cannot open"):
        SqliteAccountStore(not_a_db)


def test_reopening_keeps_data(db: Path) -> None:
    s = SqliteAccountStore(db, ["example.test"])
    s.add_user(A("alice", "example.test"), HASH)
    s.close()
    s = SqliteAccountStore(db, ["example.test"])
    try:
        assert s.list_users() == [A("alice", "example.test")]
    finally:
        s.close()


# --- domains -------------------------------------------------------------------------


def test_domains(store: SqliteAccountStore) -> None:
    store.add_domain("Other.TEST")
    store.add_domain("bücher.example")
    assert store.list_domains() == ["other.test", "xn--bcher-kva.example"]
    assert store.is_local_domain("other.test")
    assert store.is_local_domain("OTHER.test")
    assert store.is_local_domain("example.test")  # from the config, not stored
    assert not store.is_local_domain("elsewhere.test")
    store.remove_domain("other.test")
    assert store.list_domains() == ["xn--bcher-kva.example"]
    assert not store.is_local_domain("other.test")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("example.test", "config file"),
        ("bad..name", "invalid domain"),
        ("[127.0.0.1]", "address literal"),
        ("", "empty"),
    ],
)
def test_add_domain_refusals(store: SqliteAccountStore, name: str, reason: str) -> None:
    with pytest.raises(AccountError, match=reason):
        store.add_domain(name)


def test_add_domain_twice(store: SqliteAccountStore) -> None:
    store.add_domain("other.test")
    with pytest.raises(AccountError, match="exists already"):
        store.add_domain("OTHER.test")


def test_remove_domain_refusals(store: SqliteAccountStore) -> None:
    with pytest.raises(AccountError, match="no such domain"):
        store.remove_domain("nowhere.test")
    with pytest.raises(AccountError, match="config file"):
        store.remove_domain("example.test")
    store.add_domain("other.test")
    store.add_user(A("carol", "other.test"), HASH)
    store.add_alias("info@other.test", [A("carol", "other.test")])
    with pytest.raises(AccountError, match=r"1 user.*1 alias"):
        store.remove_domain("other.test")
    store.remove_alias("info@other.test")
    store.remove_user(A("carol", "other.test"))
    store.remove_domain("other.test")
    assert store.list_domains() == []


# --- users ---------------------------------------------------------------------------


def test_users(store: SqliteAccountStore) -> None:
    store.add_domain("b.test")
    store.add_user(A("zed", "example.test"), HASH)
    store.add_user(A("Alice", "example.test"), HASH + "1")
    store.add_user(A("alice", "b.test"), HASH + "2")
    assert store.list_users() == [
        A("alice", "b.test"),
        A("alice", "example.test"),
        A("zed", "example.test"),
    ]
    assert store.password_hash(A("ALICE", "Example.Test")) == HASH + "1"
    store.set_password(A("alice", "example.test"), "new-hash")
    assert store.password_hash(A("alice", "example.test")) == "new-hash"
    store.remove_user(A("alice", "example.test"))
    assert store.password_hash(A("alice", "example.test")) is None
    assert store.password_hash(A("alice", "b.test")) == HASH + "2"


def test_password_hash_of_non_account_names_is_none(store: SqliteAccountStore) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    for local in ('"alice"', "alice%example.test", "../alice", "alice\x00", "ålice"):
        assert store.password_hash(A(local, "example.test")) is None


def test_add_user_refusals(store: SqliteAccountStore) -> None:
    with pytest.raises(AccountError, match="not a local domain"):
        store.add_user(A("alice", "elsewhere.test"), HASH)
    store.add_user(A("alice", "example.test"), HASH)
    with pytest.raises(AccountError, match="exists already"):
        store.add_user(A("ALICE", "example.test"), HASH)
    store.add_alias("info@example.test", [A("alice", "example.test")])
    with pytest.raises(AccountError, match="is an alias"):
        store.add_user(A("info", "example.test"), HASH)
    with pytest.raises(AccountError, match="mailbox names"):
        store.add_user(A("../etc", "example.test"), HASH)
    with pytest.raises(AccountError, match="empty password"):
        store.add_user(A("bob", "example.test"), "")
    assert store.list_users() == [A("alice", "example.test")]


def test_set_password_and_remove_unknown_user(store: SqliteAccountStore) -> None:
    with pytest.raises(AccountError, match="no such user"):
        store.set_password(A("nobody", "example.test"), HASH)
    with pytest.raises(AccountError, match="no such user"):
        store.remove_user(A("nobody", "example.test"))


# --- aliases -------------------------------------------------------------------------


def test_aliases(store: SqliteAccountStore) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    store.add_alias("Sales@Example.test", [A("alice", "example.test"), A("Bob", "remote.test")])
    store.add_alias("@example.test", [A("alice", "example.test")])
    assert store.list_aliases() == {
        "@example.test": (A("alice", "example.test"),),
        "sales@example.test": (A("alice", "example.test"), A("Bob", "remote.test")),
    }
    store.remove_alias("SALES@example.test")
    store.remove_alias("@example.test")
    assert store.list_aliases() == {}


def test_alias_targets_keep_order_and_drop_duplicates(store: SqliteAccountStore) -> None:
    targets = [A("z", "remote.test"), A("a", "remote.test"), A("z", "remote.test")]
    store.add_alias("list@example.test", targets)
    assert store.list_aliases()["list@example.test"] == (
        A("z", "remote.test"),
        A("a", "remote.test"),
    )


def test_remote_target_with_quoted_local_part_round_trips(store: SqliteAccountStore) -> None:
    odd = A('"john@home"', "remote.test")
    store.add_alias("john@example.test", [odd])
    assert store.list_aliases()["john@example.test"] == (odd,)
    assert store.resolve(A("john", "example.test")) == Resolution(forwards=(odd,))


def test_add_alias_refusals(store: SqliteAccountStore) -> None:
    alice = A("alice", "example.test")
    store.add_user(alice, HASH)
    with pytest.raises(AccountError, match="must not shadow"):
        store.add_alias("alice@example.test", [A("x", "remote.test")])
    with pytest.raises(AccountError, match="not a local domain"):
        store.add_alias("x@remote.test", [alice])
    with pytest.raises(AccountError, match="not a local domain"):
        store.add_alias("@remote.test", [alice])
    with pytest.raises(AccountError, match="at least one target"):
        store.add_alias("x@example.test", [])
    with pytest.raises(AccountError, match="itself"):
        store.add_alias("x@example.test", [A("X", "example.test")])
    with pytest.raises(AccountError, match="mailbox names"):
        store.add_alias("x@example.test", [A("a%b", "example.test")])  # local target
    with pytest.raises(AccountError, match="mailbox names"):
        store.add_alias("x@example.test", [A("a/b+c", "example.test")])
    with pytest.raises(AccountError, match="local@domain"):
        store.add_alias("x@example.test", [A("a", "[192.0.2.1]")])
    with pytest.raises(AccountError, match="mailbox names"):
        store.add_alias("a/b@example.test", [alice])
    store.add_alias("x@example.test", [alice])
    with pytest.raises(AccountError, match="exists already"):
        store.add_alias("x@example.test", [alice])
    with pytest.raises(AccountError, match="no such alias"):
        store.remove_alias("y@example.test")
    assert list(store.list_aliases()) == ["x@example.test"]


# --- resolve -------------------------------------------------------------------------


@pytest.fixture
def populated(store: SqliteAccountStore) -> SqliteAccountStore:
    store.add_user(A("alice", "example.test"), HASH)
    store.add_user(A("bob", "example.test"), HASH)
    store.add_alias("team@example.test", [A("alice", "example.test"), A("bob", "example.test")])
    store.add_alias("ext@example.test", [A("carol", "remote.test"), A("alice", "example.test")])
    return store


def test_resolve_non_local_domain_is_none(populated: SqliteAccountStore) -> None:
    assert populated.resolve(A("alice", "remote.test")) is None
    assert populated.resolve(A("alice", "[127.0.0.1]")) is None


def test_resolve_user_case_insensitively(populated: SqliteAccountStore) -> None:
    assert populated.resolve(A("Alice", "EXAMPLE.test")) == mailboxes("alice@example.test")


def test_resolve_alias_to_users_and_forwards(populated: SqliteAccountStore) -> None:
    assert populated.resolve(A("team", "example.test")) == mailboxes(
        "alice@example.test", "bob@example.test"
    )
    assert populated.resolve(A("ext", "example.test")) == Resolution(
        mailboxes=(A("alice", "example.test"),), forwards=(A("carol", "remote.test"),)
    )


def test_resolve_unknown_user_is_empty(populated: SqliteAccountStore) -> None:
    result = populated.resolve(A("nobody", "example.test"))
    assert result == Resolution()
    assert result is not None and not result.exists


def test_resolve_plus_addressing(populated: SqliteAccountStore) -> None:
    assert populated.resolve(A("alice+news", "example.test")) == mailboxes("alice@example.test")
    assert populated.resolve(A("team+x+y", "example.test")) == mailboxes(
        "alice@example.test", "bob@example.test"
    )
    assert populated.resolve(A("nobody+x", "example.test")) == Resolution()
    # A tag that is not account-safe still reaches the account named before it.
    assert populated.resolve(A("alice+a%b", "example.test")) == mailboxes("alice@example.test")


def test_alias_names_are_account_names(populated: SqliteAccountStore) -> None:
    # "+" is not an account character: "alice+spam" can only mean plus-addressing.
    with pytest.raises(AccountError, match="mailbox names"):
        populated.add_alias("alice+spam@example.test", [A("bob", "example.test")])


def test_plus_prefers_user_then_alias(store: SqliteAccountStore) -> None:
    store.add_user(A("a", "example.test"), HASH)
    store.add_alias("b@example.test", [A("a", "example.test")])
    assert store.resolve(A("b+x", "example.test")) == mailboxes("a@example.test")


def test_resolve_catch_all_is_last(populated: SqliteAccountStore) -> None:
    populated.add_alias("@example.test", [A("bob", "example.test")])
    assert populated.resolve(A("whoever", "example.test")) == mailboxes("bob@example.test")
    assert populated.resolve(A("alice", "example.test")) == mailboxes("alice@example.test")
    assert populated.resolve(A("alice+x", "example.test")) == mailboxes("alice@example.test")
    assert populated.resolve(A("team", "example.test")) == mailboxes(
        "alice@example.test", "bob@example.test"
    )


def test_catch_all_is_per_domain(populated: SqliteAccountStore) -> None:
    populated.add_domain("other.test")
    populated.add_alias("@other.test", [A("alice", "example.test")])
    assert populated.resolve(A("x", "other.test")) == mailboxes("alice@example.test")
    assert populated.resolve(A("x", "example.test")) == Resolution()


@pytest.mark.parametrize(
    "local", ["alice%remote.test", "remote.test!alice", '"alice"', '"a b"', "../alice", "a/b"]
)
def test_wire_only_local_parts_never_match_or_relay(
    populated: SqliteAccountStore, local: str
) -> None:
    populated.add_alias("@example.test", [A("bob", "example.test")])
    # Not "no such domain" (which would mean relay): a local domain, no such user.
    assert populated.resolve(A(local, "example.test")) == Resolution()


def test_nested_aliases_expand_recursively(store: SqliteAccountStore) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    store.add_alias("a@example.test", [A("b", "example.test"), A("x", "remote.test")])
    store.add_alias("b@example.test", [A("c", "example.test")])
    store.add_alias("c@example.test", [A("alice", "example.test"), A("alice+tag", "example.test")])
    assert store.resolve(A("a", "example.test")) == Resolution(
        mailboxes=(A("alice", "example.test"),), forwards=(A("x", "remote.test"),)
    )


def test_alias_loops_are_refused(store: SqliteAccountStore) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    store.add_alias("a@example.test", [A("b", "example.test")])
    with pytest.raises(
        AccountError, match=re.escape("b@example.test -> a@example.test -> b@example.test")
    ):
        store.add_alias("b@example.test", [A("a", "example.test"), A("alice", "example.test")])
    with pytest.raises(AccountError, match="loop"):  # through a plus-address
        store.add_alias("b@example.test", [A("a+x", "example.test")])
    store.add_alias("c@example.test", [A("a", "example.test")])
    with pytest.raises(
        AccountError, match=re.escape("b@example.test -> c@example.test -> a@example.test")
    ):
        store.add_alias("b@example.test", [A("c", "example.test")])
    # Diamonds are not loops.
    store.add_alias("b@example.test", [A("alice", "example.test")])
    store.add_alias("d@example.test", [A("a", "example.test"), A("c", "example.test")])
    assert store.resolve(A("d", "example.test")) == mailboxes("alice@example.test")


def test_alias_loops_in_an_older_database_are_cut(db: Path) -> None:
    store = SqliteAccountStore(db, config_domains=["example.test"])
    store.add_user(A("alice", "example.test"), HASH)
    store.add_alias("a@example.test", [A("b", "example.test")])
    store.close()
    conn = sqlite3.connect(db)  # made before loops were refused
    with conn:
        conn.executemany(
            "INSERT INTO aliases (alias, position, target) VALUES (?, ?, ?)",
            [("b@example.test", 0, "a@example.test"), ("b@example.test", 1, "alice@example.test")],
        )
    conn.close()
    store = SqliteAccountStore(db, config_domains=["example.test"])
    try:
        assert store.resolve(A("a", "example.test")) == mailboxes("alice@example.test")
        assert store.resolve(A("b", "example.test")) == mailboxes("alice@example.test")
    finally:
        store.close()


def test_remove_user_named_by_aliases(store: SqliteAccountStore) -> None:
    alice, bob = A("alice", "example.test"), A("bob", "example.test")
    store.add_user(alice, HASH)
    store.add_user(bob, HASH)
    store.add_alias(
        "team@example.test", [alice, A("bob+team", "example.test"), A("x", "remote.test")]
    )
    store.add_alias("@example.test", [A("alice+any", "example.test")])
    store.add_alias("other@example.test", [bob])
    assert store.aliases_to(alice) == {
        "@example.test": (A("alice+any", "example.test"),),
        "team@example.test": (alice,),
    }
    with pytest.raises(AccountError, match=re.escape("@example.test, team@example.test")):
        store.remove_user(alice)
    assert store.password_hash(alice) == HASH  # refused: nothing changed
    changed = store.remove_user(alice, from_aliases=True)
    assert changed == {
        "@example.test": (),
        "team@example.test": (A("bob+team", "example.test"), A("x", "remote.test")),
    }
    assert store.password_hash(alice) is None
    assert store.list_aliases() == {
        "other@example.test": (bob,),
        "team@example.test": (A("bob+team", "example.test"), A("x", "remote.test")),
    }
    assert store.remove_user(bob, from_aliases=True) == {
        "other@example.test": (),
        "team@example.test": (A("x", "remote.test"),),
    }


def test_a_member_that_no_longer_exists_is_logged_at_delivery(
    store: SqliteAccountStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    store.add_user(A("bob", "example.test"), HASH)
    store.add_alias("team@example.test", [A("alice", "example.test"), A("bob", "example.test")])
    with caplog.at_level("WARNING", "postoffice.accounts"):
        assert store.resolve(A("team", "example.test")) == mailboxes(
            "alice@example.test", "bob@example.test"
        )
        assert caplog.records == []
        # An older `user remove` left the alias alone (or it was edited by hand).
        store._conn.execute("DELETE FROM users WHERE address = 'alice@example.test'")
        store._stale = True
        assert store.resolve(A("team", "example.test")) == mailboxes("bob@example.test")
    assert [r.getMessage() for r in caplog.records] == [
        "alias team@example.test: member alice@example.test is no user or alias (removed?);"
        " its copy is dropped"
    ]


def test_alias_depth_limit(store: SqliteAccountStore) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    chain = [f"a{i}" for i in range(MAX_ALIAS_DEPTH + 1)]
    for here, there in itertools.pairwise(chain):
        store.add_alias(f"{here}@example.test", [A(there, "example.test")])
    store.add_alias(f"{chain[-1]}@example.test", [A("alice", "example.test")])
    # chain[1] .. chain[10] is MAX_ALIAS_DEPTH aliases deep: still delivered.
    assert store.resolve(A(chain[1], "example.test")) == mailboxes("alice@example.test")
    # chain[0] is one level more: cut, nothing is delivered.
    assert store.resolve(A(chain[0], "example.test")) == Resolution()


def test_unknown_local_targets_are_dropped(store: SqliteAccountStore) -> None:
    store.add_user(A("alice", "example.test"), HASH)
    store.add_alias("@example.test", [A("alice", "example.test")])
    store.add_alias("x@example.test", [A("gone", "example.test"), A("alice", "example.test")])
    store.add_alias("y@example.test", [A("gone", "example.test")])
    assert store.resolve(A("x", "example.test")) == mailboxes("alice@example.test")
    # The catch-all does not swallow a stale alias target.
    assert store.resolve(A("y", "example.test")) == Resolution()


def test_target_domain_locality_is_decided_at_resolve_time(store: SqliteAccountStore) -> None:
    store.add_alias("x@example.test", [A("carol", "later.test")])
    assert store.resolve(A("x", "example.test")) == Resolution(forwards=(A("carol", "later.test"),))
    store.add_domain("later.test")
    store.add_user(A("carol", "later.test"), HASH)
    assert store.resolve(A("x", "example.test")) == mailboxes("carol@later.test")


def test_postmaster_is_per_domain(store: SqliteAccountStore) -> None:
    """#11 item 11: one domain's postmaster never stands in for another's."""
    store.add_domain("other.test")
    # Nobody made one: the admin must (RFC 5321 §4.5.1); until then, unknown.
    assert store.resolve(A("Postmaster", "other.test")) == Resolution()
    store.add_user(A("admin", "other.test"), HASH)
    store.add_alias("postmaster@other.test", [A("admin", "other.test")])
    assert store.resolve(A("postmaster", "other.test")) == mailboxes("admin@other.test")
    # A domain without its own postmaster does not get other.test's.
    assert store.resolve(A("postmaster", "example.test")) == Resolution()
    store.add_user(A("postmaster", "example.test"), HASH)
    assert store.resolve(A("postmaster", "example.test")) == mailboxes("postmaster@example.test")
    assert store.resolve(A("postmaster", "other.test")) == mailboxes("admin@other.test")
    # Nothing without a domain is resolved here (the session maps <postmaster>).
    assert store.resolve(A("postmaster", "")) is None
    assert store.resolve(A("admin", "")) is None


# --- other processes -----------------------------------------------------------------


def test_second_instance_sees_writes_without_reopening(db: Path) -> None:
    server = SqliteAccountStore(db, ["example.test"])
    cli = SqliteAccountStore(db, ["example.test"])
    try:
        assert server.resolve(A("alice", "example.test")) == Resolution()
        cli.add_user(A("alice", "example.test"), HASH)
        assert server.resolve(A("alice", "example.test")) == mailboxes("alice@example.test")
        assert server.password_hash(A("alice", "example.test")) == HASH
        cli.add_domain("new.test")
        assert server.is_local_domain("new.test")
        cli.add_alias("@new.test", [A("alice", "example.test")])
        assert server.resolve(A("x", "new.test")) == mailboxes("alice@example.test")
        cli.remove_user(A("alice", "example.test"), from_aliases=True)
        assert server.password_hash(A("alice", "example.test")) is None
        assert server.resolve(A("x", "new.test")) == Resolution()
    finally:
        cli.close()
        server.close()


def test_lookups_skip_the_pragma_while_the_files_are_untouched(db: Path) -> None:
    server = SqliteAccountStore(db, ["example.test"])
    cli = SqliteAccountStore(db, ["example.test"])
    statements: list[str] = []
    server._conn.set_trace_callback(statements.append)
    try:
        server.resolve(A("alice", "example.test"))
        statements.clear()
        for _ in range(5):
            assert server.resolve(A("alice", "example.test")) == Resolution()
        assert statements == []  # nothing changed on disk: the snapshot is used as is
        cli.add_user(A("alice", "example.test"), HASH)
        assert server.resolve(A("alice", "example.test")) == mailboxes("alice@example.test")
        assert any("data_version" in s for s in statements)
    finally:
        cli.close()
        server.close()


def test_another_process_writes_and_open_store_sees_it(db: Path) -> None:
    server = SqliteAccountStore(db, ["example.test"])
    try:
        assert server.list_users() == []
        code = (
            "import sys; from pathlib import Path;"
            "from postoffice.mail.address import Address;"
            "from postoffice.storage.sqlite_accounts import SqliteAccountStore as S;"
            "s = S(Path(sys.argv[1]), ['example.test']);"
            "s.add_user(Address('dave', 'example.test'), 'h'); s.close()"
        )
        subprocess.run([sys.executable, "-c", code, str(db)], check=True, timeout=60)
        assert server.list_users() == [A("dave", "example.test")]
        assert server.resolve(A("dave", "example.test")) == mailboxes("dave@example.test")
    finally:
        server.close()


def test_refused_write_changes_nothing(db: Path) -> None:
    s = SqliteAccountStore(db, ["example.test"])
    try:
        s.add_user(A("alice", "example.test"), HASH)
        with pytest.raises(AccountError):
            s.add_alias("x@example.test", [A("alice", "example.test"), A("y", "[1.2.3.4]")])
        with pytest.raises(AccountError):
            s.add_user(A("alice", "example.test"), HASH)
        # A further write works (no transaction left open) and nothing partial stayed.
        s.add_alias("x@example.test", [A("alice", "example.test")])
        assert s.list_aliases() == {"x@example.test": (A("alice", "example.test"),)}
    finally:
        s.close()


# --- quotas ---------------------------------------------------------------------------


def test_app_passwords_per_user(store: SqliteAccountStore) -> None:
    alice, bob = A("alice", "example.test"), A("bob", "example.test")
    store.add_user(alice, HASH)
    store.add_user(bob, HASH)
    assert store.app_passwords(alice) == []
    phone = store.add_app_password(alice, " phone ", "d1" * 32)
    laptop = store.add_app_password(A("Alice", "EXAMPLE.test"), "laptop", "d2" * 32)
    listed = store.app_passwords(alice)
    assert [(p.id, p.label, p.digest) for p in listed] == [
        (phone, "phone", "d1" * 32),
        (laptop, "laptop", "d2" * 32),
    ]
    assert store.app_passwords(bob) == []
    with pytest.raises(AccountError, match="no such app password"):
        store.remove_app_password(bob, phone)  # only its owner revokes it
    store.remove_app_password(alice, phone)
    assert [p.id for p in store.app_passwords(alice)] == [laptop]
    for label in ("", "x" * 65, "tab\there"):
        with pytest.raises(AccountError, match="needs a name"):
            store.add_app_password(alice, label, "d3" * 32)
    with pytest.raises(AccountError, match="no such user"):
        store.add_app_password(A("carol", "example.test"), "phone", "d4" * 32)
    for n in range(MAX_APP_PASSWORDS - 1):
        store.add_app_password(bob, f"client {n}", f"{n:064x}")
    store.add_app_password(bob, "the last", "e" * 64)
    with pytest.raises(AccountError, match="at most"):
        store.add_app_password(bob, "one more", "f" * 64)
    store.remove_user(alice)
    store.add_user(alice, HASH)
    assert store.app_passwords(alice) == []  # they went with the user


def test_admin_flag_per_user(store: SqliteAccountStore) -> None:
    alice, bob = A("alice", "example.test"), A("bob", "example.test")
    store.add_user(alice, HASH)
    store.add_user(bob, HASH)
    assert not store.is_admin(alice)
    store.set_admin(alice, True)
    assert store.is_admin(alice) and store.is_admin(A("Alice", "EXAMPLE.test"))
    assert not store.is_admin(bob) and not store.is_admin(A("carol", "example.test"))
    with pytest.raises(AccountError, match="no such user"):
        store.set_admin(A("carol", "example.test"), True)
    store.set_admin(alice, False)
    assert not store.is_admin(alice)
    store.set_admin(bob, True)
    store.remove_user(bob)
    store.add_user(bob, HASH)
    assert not store.is_admin(bob)  # a new user, not the admin that went


def test_quota_per_user(store: SqliteAccountStore) -> None:
    alice = A("alice", "example.test")
    store.add_user(alice, HASH)
    assert store.quota(alice) is None  # [limits] mailbox_quota applies
    store.set_quota(alice, 500 * 2**20)
    assert store.quota(alice) == 500 * 2**20
    assert store.quota(A("Alice", "EXAMPLE.test")) == 500 * 2**20
    store.set_quota(alice, 0)  # none, whatever the default
    assert store.quota(alice) == 0
    store.set_quota(alice, None)
    assert store.quota(alice) is None
    with pytest.raises(AccountError, match="no such user"):
        store.set_quota(A("bob", "example.test"), 10)
    with pytest.raises(AccountError, match="a quota is"):
        store.set_quota(alice, -1)
    assert store.quota(A('"x"', "example.test")) is None


def test_quota_changes_are_seen_by_another_connection(db: Path) -> None:
    reader = SqliteAccountStore(db, config_domains=["example.test"])
    writer = SqliteAccountStore(db, config_domains=["example.test"])
    try:
        writer.add_user(A("alice", "example.test"), HASH)
        assert reader.quota(A("alice", "example.test")) is None
        writer.set_quota(A("alice", "example.test"), 1234)
        # As at RCPT: quota() follows the resolve() that checked the snapshot.
        assert reader.resolve(A("alice", "example.test")) == mailboxes("alice@example.test")
        assert reader.quota(A("alice", "example.test")) == 1234
    finally:
        reader.close()
        writer.close()


def test_a_version_1_database_is_migrated(db: Path) -> None:
    # The first release's schema, with a user and an alias in it.
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript(
        """
        CREATE TABLE domains (name TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
        CREATE TABLE users (
            address TEXT PRIMARY KEY NOT NULL, password_hash TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE aliases (
            alias TEXT NOT NULL, position INTEGER NOT NULL, target TEXT NOT NULL,
            PRIMARY KEY (alias, position)
        ) WITHOUT ROWID;
        INSERT INTO users VALUES ('alice@example.test', 'old-hash');
        INSERT INTO aliases VALUES ('team@example.test', 0, 'alice@example.test');
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    store = SqliteAccountStore(db, config_domains=["example.test"])
    try:
        alice = A("alice", "example.test")
        assert store.password_hash(alice) == "old-hash"
        assert store.resolve(A("team", "example.test")) == mailboxes("alice@example.test")
        assert store.quota(alice) is None
        store.set_quota(alice, 4096)
        assert store.quota(alice) == 4096
        assert not store.is_admin(alice)  # 2 -> 3: nobody is an admin until flagged
        store.set_admin(alice, True)
        assert store.is_admin(alice)
    finally:
        store.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    finally:
        conn.close()
    SqliteAccountStore(db).close()  # opening a migrated database changes nothing


def test_the_admin_flag_is_set_cleared_and_seen_by_another_connection(db: Path) -> None:
    writer = SqliteAccountStore(db, config_domains=["example.test"])
    reader = SqliteAccountStore(db, config_domains=["example.test"])
    try:
        alice, bob = A("alice", "example.test"), A("bob", "example.test")
        writer.add_user(alice, "h1")
        writer.add_user(bob, "h2")
        assert not reader.is_admin(alice)
        writer.set_admin(alice, True)
        reader._stale = True  # the next read checks data_version at once
        assert reader.is_admin(alice) and not reader.is_admin(bob)
        assert writer.is_admin(A("Alice", "EXAMPLE.test"))  # account form, as logins are
        writer.set_admin(alice, False)
        assert not writer.is_admin(alice)
        with pytest.raises(AccountError, match="no such user"):
            writer.set_admin(A("carol", "example.test"), True)
        # Removed and added again: a new user, not an admin.
        writer.set_admin(alice, True)
        writer.remove_user(alice)
        writer.add_user(alice, "h3")
        assert not writer.is_admin(alice)
    finally:
        writer.close()
        reader.close()
