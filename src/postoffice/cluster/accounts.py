"""The account store in PostgreSQL, for several nodes sharing one database.

Every rule of the embedded store holds here unchanged (what a domain, user
or alias may be, the refusals, the resolve order, alias loops): this class
is ``SqliteAccountStore`` with the storage underneath replaced, so the two
cannot drift apart.  Its write methods run their checks against a snapshot
read inside the write transaction and then issue the same portable SQL
(``_Writes`` turns SQLite's ``?`` placeholders into psycopg's ``%s``).

Reads, asked for every RCPT and login on the event loop, never touch the
network: the whole store is an in-memory snapshot, as in the embedded store.
A server keeps it current with a thread of its own (``follow=True``):

- every write transaction bumps ``accounts_version`` and sends
  ``NOTIFY postoffice_accounts``, delivered to every node at commit;
- the thread LISTENs, and on a notification reads the tables again in one
  REPEATABLE READ transaction and swaps the snapshot in (a change made on
  any node is in force on all of them in milliseconds, well within 1 s);
- it also compares ``accounts_version`` every ``RESYNC_SECONDS``, in case a
  notification was lost (a connection pooler that drops them), and reads
  everything again after a reconnect, as notifications sent while it was
  away are gone.

While the database is unreachable, a server keeps serving the last snapshot
(logins and deliveries keep working; changes wait) and reconnects with a
bounded backoff.  The CLI (``follow=False``) reads the tables afresh for
each question instead: it asks one or two and exits.

Writes are serialised by a transaction-scoped advisory lock, the
equivalent of the embedded store's ``BEGIN IMMEDIATE``: two nodes' CLI
commands racing (the same alias added twice) cannot both pass the checks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from postoffice.cluster.db import (
    ACCOUNTS_WRITE_LOCK,
    ClusterError,
    connect,
    describe,
    driver,
    migrate,
)
from postoffice.mail.address import Address
from postoffice.storage.accounts import AccountError
from postoffice.storage.sqlite_accounts import (
    SqliteAccountStore,
    _Snapshot,
    _split_stored,
    read_app_passwords,
)

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

log = logging.getLogger("postoffice.cluster.accounts")

CHANNEL = "postoffice_accounts"
WAIT_SECONDS = 0.5  # the listener's longest wait: how soon close() is answered
RESYNC_SECONDS = 5.0  # accounts_version compared this often without a notification
RECONNECT_MIN = 0.5
RECONNECT_MAX = 10.0

# Version 1: the embedded store's tables (sqlite_accounts.py, schema 2), plus
# the change counter the listeners compare.
MIGRATIONS = (
    """
    CREATE TABLE domains (
        name text PRIMARY KEY
    );
    CREATE TABLE users (
        address text PRIMARY KEY,         -- "local@domain", account form
        password_hash text NOT NULL,
        quota bigint                      -- bytes, 0 for none, NULL for [limits] mailbox_quota
    );
    CREATE TABLE aliases (
        alias text NOT NULL,              -- "local@domain", or "@domain" (catch-all)
        position integer NOT NULL,        -- keeps the targets in the order given
        target text NOT NULL,
        PRIMARY KEY (alias, position)
    );
    CREATE TABLE accounts_version (
        n bigint NOT NULL
    );
    INSERT INTO accounts_version (n) VALUES (0)
    """,
    # Version 2: the admin flag (`postoffice user admin`, the web pages), as
    # the embedded store's schema 3 has it: an integer, so the write methods'
    # SQL ("admin = ?" with 0 or 1, "WHERE admin <> 0") is the same on both.
    "ALTER TABLE users ADD COLUMN admin integer NOT NULL DEFAULT 0",
    # Version 3: app passwords, as the embedded store's schema 4.
    """
    CREATE TABLE app_passwords (
        address text NOT NULL,
        id text NOT NULL,
        label text NOT NULL,
        digest text NOT NULL,              -- SHA-256 (hex) of the normalised password
        created double precision NOT NULL,
        PRIMARY KEY (address, id)
    )
    """,
)


class _Writes:
    """The two calls the embedded store's write methods make, on psycopg."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @staticmethod
    def _sql(statement: str) -> bytes:
        # The embedded store's statements hold no literal "?" or "%".
        return statement.replace("?", "%s").encode()

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        self._conn.execute(self._sql(statement), params)

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany(self._sql(statement), rows)


def _read_snapshot(conn: Connection) -> tuple[int, _Snapshot]:
    """Every table, in the caller's transaction; with the version it shows."""
    version_row = conn.execute("SELECT n FROM accounts_version").fetchone()
    version = int(version_row[0]) if version_row else 0
    domains = frozenset(str(row[0]) for row in conn.execute("SELECT name FROM domains"))
    users: dict[str, str] = {}
    quotas: dict[str, int] = {}
    for address, password_hash, quota in conn.execute(
        "SELECT address, password_hash, quota FROM users"
    ):
        users[address] = password_hash
        if quota is not None:
            quotas[address] = int(quota)
    grouped: dict[str, list[Address]] = {}
    for alias, target in conn.execute("SELECT alias, target FROM aliases ORDER BY alias, position"):
        grouped.setdefault(alias, []).append(_split_stored(target))
    admins = frozenset(
        str(row[0]) for row in conn.execute("SELECT address FROM users WHERE admin <> 0")
    )
    aliases = {k: tuple(v) for k, v in grouped.items()}
    return version, _Snapshot(domains, users, quotas, aliases, admins, read_app_passwords(conn))


class PostgresAccountStore(SqliteAccountStore):
    """``AccountStore`` on PostgreSQL; ``follow``: keep the snapshot current
    from NOTIFY in a thread (the server), else read afresh per call (the CLI)."""

    def __init__(
        self, url: str, config_domains: Sequence[str] = (), *, follow: bool = False
    ) -> None:
        # Not the embedded store's __init__: no file.  These are the
        # attributes its methods use.
        self.url = url
        self._config_domains = tuple(d.lower() for d in config_domains)
        self._config_set = frozenset(self._config_domains)
        self._lock = threading.RLock()  # the write connection
        self._swap = threading.Lock()  # the snapshot and its version, swapped together
        self._snapshot = _Snapshot()
        self._version = -1
        self._follow = follow
        self._stale = not follow  # the embedded store's quota() reads it
        self._stop = threading.Event()
        # Set once the listener LISTENs and has read the tables (tests wait for it).
        self.listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._pg: Connection | None = None  # writes (and the CLI's reads)
        try:
            driver()
            with self._lock:
                conn = self._connection()
                migrate(conn, "accounts", MIGRATIONS)
                self._reload(conn)
        except ClusterError as exc:
            self.close()
            raise AccountError(str(exc)) from None
        if follow:
            self._thread = threading.Thread(
                target=self._listen, name="postoffice-accounts-listen", daemon=True
            )
            self._thread.start()

    # --- connections and the snapshot ------------------------------------------------
    def _connection(self) -> Connection:
        """The write (and CLI read) connection, made again if it was lost."""
        if self._pg is None or self._pg.closed or self._pg.broken:
            # autocommit: every transaction is an explicit conn.transaction().
            self._pg = connect(self.url, autocommit=True)
        return self._pg

    def _reload(self, conn: Connection) -> _Snapshot:
        """Read everything in one REPEATABLE READ transaction and keep it,
        unless a newer snapshot was kept meanwhile (by another thread)."""
        import psycopg

        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                version, snapshot = _read_snapshot(conn)
        except psycopg.Error as exc:
            raise ClusterError(f"[cluster] database: {describe(exc)}") from None
        with self._swap:
            if version >= self._version:
                self._snapshot, self._version = snapshot, version
            return self._snapshot

    def _current(self) -> _Snapshot:
        if self._follow:
            return self._snapshot  # kept current by the listener thread
        with self._lock:
            try:
                return self._reload(self._connection())
            except ClusterError as exc:
                # As the embedded store: the last good snapshot rather than none.
                log.error("%s", exc)
                return self._snapshot

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[Any, _Snapshot]]:
        """A write transaction, serialised across nodes, with the tables read
        inside it for the checks; every node is told at commit."""
        import psycopg

        with self._lock:
            try:
                conn = self._connection()
            except ClusterError as exc:
                raise AccountError(str(exc)) from None
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ACCOUNTS_WRITE_LOCK,))
                    # Holding the lock, no other writer commits: READ COMMITTED
                    # statements from here on see the current tables.
                    _version, snapshot = _read_snapshot(conn)
                    yield _Writes(conn), snapshot
                    conn.execute("UPDATE accounts_version SET n = n + 1")
                    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            except psycopg.Error as exc:
                raise AccountError(f"[cluster] database: {describe(exc)}") from None
            # Our own change is in force here at once, not when the notification
            # comes back round.
            with contextlib.suppress(ClusterError):
                self._reload(conn)

    # --- the listener ------------------------------------------------------------------
    def _listen(self) -> None:
        """LISTEN, and read the tables again on each notification; reconnect
        with a bounded backoff, serving the last snapshot meanwhile."""
        import psycopg

        delay = RECONNECT_MIN
        lost = False
        while not self._stop.is_set():
            try:
                with connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._reload(conn)  # what changed while nobody listened
                    self.listening.set()
                    if lost:
                        log.warning("[cluster] database reachable again; accounts reloaded")
                    lost, delay = False, RECONNECT_MIN
                    self._follow_changes(conn)
            except (ClusterError, psycopg.Error) as exc:
                if self._stop.is_set():
                    break
                if not lost:
                    log.error(
                        "lost the [cluster] database (%s); serving the accounts last read,"
                        " reconnecting",
                        describe(exc),
                    )
                lost = True
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def _follow_changes(self, conn: Connection) -> None:
        checked = time.monotonic()
        while not self._stop.is_set():
            woken = False
            for _notify in conn.notifies(timeout=WAIT_SECONDS, stop_after=1):
                woken = True
            if woken or time.monotonic() - checked >= RESYNC_SECONDS:
                checked = time.monotonic()
                row = conn.execute("SELECT n FROM accounts_version").fetchone()
                if row is None or int(row[0]) != self._version:
                    self._reload(conn)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT_SECONDS * 4 + 1)
            self._thread = None
        with self._lock:
            if self._pg is not None:
                self._pg.close()
                self._pg = None
