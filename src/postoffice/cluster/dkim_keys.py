"""DKIM signing keys in PostgreSQL, so every node signs with the same keys.

The keys are made, named and checked by policy/dkim_keys.py exactly as in
the embedded store (RSA 2048 and Ed25519 per domain, selectors never
reused); only where they are kept differs.  One table holds every key a
domain ever had, its private key as PEM and whether it is active: a
rotation marks the old ones inactive (their DNS records should stay
published a few days) and inserts the new ones, in one transaction, so a
node sees all new keys or none.

Signing asks for keys on every submitted message, from worker threads: it
must not wait for the network.  ``ClusterKeyStore`` keeps every active key
in memory (parsed once) and, on a server, follows ``NOTIFY postoffice_dkim``
from a thread of its own: a key made with the CLI on any node is used by
all of them from the next message on (milliseconds; a version counter
compared every ``RESYNC_SECONDS`` covers a lost notification).  While the
database is away, nodes keep signing with the keys last read.

Private keys in the database are as secret as the data dir's files were:
give the postoffice database role to postoffice alone (docs/cluster.md).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from postoffice.cluster.db import DKIM_WRITE_LOCK, ClusterError, connect, describe, migrate
from postoffice.cluster.listen import Listener
from postoffice.policy.dkim_keys import (
    ALGORITHMS,
    DkimKey,
    DkimKeyError,
    SigningKey,
    has_keys_already,
    key_domain,
    new_selector,
    private_pem,
    signing_key,
)

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

log = logging.getLogger("postoffice.cluster.dkim")

CHANNEL = "postoffice_dkim"
WAIT_SECONDS = 0.5  # the listener's longest wait: how soon close() is answered
RESYNC_SECONDS = 5.0

MIGRATIONS = (
    """
    CREATE TABLE dkim_keys (
        domain text NOT NULL,
        selector text NOT NULL,
        algorithm text NOT NULL,          -- rsa-sha256 or ed25519-sha256
        private_pem bytea NOT NULL,
        created timestamptz NOT NULL DEFAULT now(),
        active boolean NOT NULL,          -- signs now (else kept: the name is taken)
        PRIMARY KEY (domain, selector)
    );
    CREATE TABLE dkim_version (
        n bigint NOT NULL
    );
    INSERT INTO dkim_version (n) VALUES (0)
    """,
)


def open_db(url: str) -> Connection:
    conn = connect(url, autocommit=True)
    try:
        migrate(conn, "dkim", MIGRATIONS)
    except ClusterError:
        conn.close()
        raise
    return conn


def _keys(rows: Sequence[Sequence[Any]]) -> list[DkimKey]:
    """Rows (domain, selector, algorithm, private_pem) as keys, RSA first."""
    keys = [
        DkimKey(str(d), str(s), str(a), None, bytes(p)) for d, s, a, p in rows if a in ALGORITHMS
    ]
    return sorted(keys, key=lambda k: (k.domain, ALGORITHMS.index(k.algorithm), k.selector))


def generate(
    url: str, domain: str, *, rotate: bool = False, now: datetime.datetime | None = None
) -> list[DkimKey]:
    """``policy.dkim_keys.generate`` into the database: an RSA and an Ed25519
    key for ``domain``, made the active ones; refused when it has keys
    already, unless ``rotate``."""
    import psycopg

    name = key_domain(domain)
    when = now or datetime.datetime.now(datetime.UTC)
    pems = {algorithm: private_pem(algorithm) for algorithm in ALGORITHMS}  # before the lock
    try:
        with open_db(url) as conn, conn.transaction():
            # Serialised across nodes: two CLIs cannot both find no keys.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DKIM_WRITE_LOCK,))
            rows = conn.execute(
                "SELECT selector, active FROM dkim_keys WHERE domain = %s ORDER BY selector",
                (name,),
            ).fetchall()
            active = [str(s) for s, a in rows if a]
            if active and not rotate:
                raise has_keys_already(name, active)
            taken = {str(s) for s, _a in rows}
            keys = []
            for algorithm in ALGORITHMS:
                selector = new_selector(taken.__contains__, algorithm, when)
                taken.add(selector)
                keys.append(DkimKey(name, selector, algorithm, None, pems[algorithm]))
            conn.execute("UPDATE dkim_keys SET active = false WHERE domain = %s", (name,))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO dkim_keys (domain, selector, algorithm, private_pem, created,"
                    " active) VALUES (%s, %s, %s, %s, %s, true)",
                    [(k.domain, k.selector, k.algorithm, k.pem, when) for k in keys],
                )
            conn.execute("UPDATE dkim_version SET n = n + 1")
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
    except ClusterError as exc:
        raise DkimKeyError(str(exc)) from None
    except psycopg.Error as exc:
        raise DkimKeyError(f"[cluster] database: {describe(exc)}") from None
    return keys


def load_keys(url: str, domain: str) -> list[DkimKey]:
    """The active keys of ``domain`` ([] when it has none)."""
    import psycopg

    name = key_domain(domain)
    try:
        with open_db(url) as conn:
            rows = conn.execute(
                "SELECT domain, selector, algorithm, private_pem FROM dkim_keys"
                " WHERE domain = %s AND active",
                (name,),
            ).fetchall()
    except ClusterError as exc:
        raise DkimKeyError(str(exc)) from None
    except psycopg.Error as exc:
        raise DkimKeyError(f"[cluster] database: {describe(exc)}") from None
    return _keys(rows)


class ClusterKeyStore:
    """``SigningKeys`` (policy/dkim_keys.py) from the database: every active
    key in memory; ``follow``: kept current by a listener thread (a server),
    else read once (a command)."""

    def __init__(self, url: str, *, follow: bool) -> None:
        self._swap = threading.Lock()
        self._keys: dict[str, list[SigningKey]] = {}
        self._broken: dict[str, str] = {}  # domain -> why its keys cannot be used
        self._version = -1
        try:
            with open_db(url) as conn:
                self._reload(conn)
        except ClusterError as exc:
            raise DkimKeyError(str(exc)) from None
        self._listener: Listener | None = None
        if follow:
            self._listener = Listener(
                url,
                CHANNEL,
                self._follow,
                log=log,
                what="signing with the DKIM keys last read",
                name="postoffice-dkim-listen",
            )
            self._listener.start()

    @property
    def listening(self) -> threading.Event | None:
        return self._listener.listening if self._listener else None

    def keys_for(self, domain: str) -> list[SigningKey]:
        name = key_domain(domain)
        with self._swap:
            keys, broken = self._keys.get(name), self._broken.get(name)
        if broken is not None:
            raise DkimKeyError(broken)
        return keys or []

    def _reload(self, conn: Connection) -> None:
        """Every active key, read in one transaction with the version it shows."""
        import psycopg

        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                row = conn.execute("SELECT n FROM dkim_version").fetchone()
                version = int(row[0]) if row else 0
                rows = conn.execute(
                    "SELECT domain, selector, algorithm, private_pem FROM dkim_keys WHERE active"
                ).fetchall()
        except psycopg.Error as exc:
            raise ClusterError(f"[cluster] database: {describe(exc)}") from None
        keys: dict[str, list[SigningKey]] = {}
        broken: dict[str, str] = {}
        for key in _keys(rows):
            try:
                keys.setdefault(key.domain, []).append(signing_key(key))
            except DkimKeyError as exc:
                broken[key.domain] = str(exc)
        with self._swap:
            if version >= self._version:
                self._keys, self._broken, self._version = keys, broken, version

    def _follow(self, conn: Connection) -> None:
        self._reload(conn)  # what changed while nobody listened
        checked = time.monotonic()
        assert self._listener is not None
        while not self._listener.stopping.is_set():
            woken = False
            for _notify in conn.notifies(timeout=WAIT_SECONDS, stop_after=1):
                woken = True
            if woken or time.monotonic() - checked >= RESYNC_SECONDS:
                checked = time.monotonic()
                row = conn.execute("SELECT n FROM dkim_version").fetchone()
                if row is None or int(row[0]) != self._version:
                    self._reload(conn)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close(WAIT_SECONDS * 4 + 1)
