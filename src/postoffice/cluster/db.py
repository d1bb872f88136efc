"""The PostgreSQL connection and the versioned schema every cluster store shares.

The driver is psycopg 3 rather than asyncpg.  The account store interface
(storage/accounts.py) is synchronous and is used by the CLI as much as by
the server, so the driver must offer a plain blocking API; psycopg 3 has
one (and an asyncio one with the same types for the queue and mailbox
stores to come), LISTEN/NOTIFY with a timeout (``Connection.notifies``),
ships type hints, and is the maintained successor of psycopg2 by the same
authors.  asyncpg is asyncio-only: the CLI and the store's own listener
thread would need an event loop each.  It comes with the ``cluster`` extra
(``pip install 'postoffice[cluster]'``); without it only [cluster] fails.

Each part of postoffice that keeps data here (``accounts`` now; the queue and
mailboxes later) has its own schema version, a row of ``postoffice_schema``,
and a list of migrations.  ``migrate`` runs the missing ones in one
transaction (PostgreSQL's DDL is transactional: a failed step leaves the
old schema whole) under an advisory lock, so nodes starting together
migrate once; a database newer than this release is refused, not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.Connection[Any]


class ClusterError(Exception):
    """The database cannot be used (driver missing, unreachable, newer schema)."""


# Advisory lock keys (one 64-bit space per database): the schema migration,
# then one per store.  Fixed numbers, so every node and the CLI agree.
MIGRATE_LOCK = 0x706F_0001
ACCOUNTS_WRITE_LOCK = 0x706F_0002
DKIM_WRITE_LOCK = 0x706F_0010  # clear of the numbers other stores may take next

CONNECT_TIMEOUT = 10  # seconds; libpq's connect_timeout

# TCP keepalives: a listening connection whose peer vanished (a partition, a
# host gone) is noticed in about a minute instead of never.
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS postoffice_schema (
    component text PRIMARY KEY,
    version integer NOT NULL
)
"""


def driver() -> None:
    """Raise ClusterError when psycopg is not installed."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ClusterError(
            "[cluster] database needs the PostgreSQL driver: pip install 'postoffice[cluster]'"
        ) from None


def connect(url: str, *, autocommit: bool = False) -> Connection:
    """A new connection to ``url``; ClusterError (without the URL's password) if none."""
    driver()
    import psycopg

    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="postoffice",
            **_KEEPALIVES,
        )
    except psycopg.Error as exc:
        raise ClusterError(f"cannot connect to the [cluster] database: {describe(exc)}") from None


def describe(exc: BaseException) -> str:
    """The first line of a driver error: libpq's messages can run to several."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def migrate(conn: Connection, component: str, steps: Sequence[str]) -> int:
    """Bring ``component`` to version ``len(steps)``: step i (one or more SQL
    statements) takes it from version i to i + 1.  Returns the version."""
    import psycopg

    latest = len(steps)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute(_SCHEMA_TABLE)
            row = conn.execute(
                "SELECT version FROM postoffice_schema WHERE component = %s", (component,)
            ).fetchone()
            version = int(row[0]) if row else 0
            if version > latest:
                raise ClusterError(
                    f"the [cluster] database has {component} schema version {version}; this"
                    f" postoffice knows up to {latest} (was it written by a newer release?)"
                )
            for step in steps[version:]:
                # Without parameters psycopg sends a step as one simple query:
                # several statements, comments with ";" in them included.
                conn.execute(step.encode())
            conn.execute(
                "INSERT INTO postoffice_schema (component, version) VALUES (%s, %s)"
                " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                (component, latest),
            )
    except psycopg.Error as exc:
        raise ClusterError(f"[cluster] database: {component} schema: {describe(exc)}") from None
    return latest
