"""``postoffice cluster migrate`` and ``export``: accounts between the embedded
SQLite file and the [cluster] database, both ways, verified.

What moves today are the accounts: domains added with the CLI, users with
their password hashes, quotas, admin flags and app passwords, aliases with their targets in order.
(Mailboxes and the queue follow when they move to the database: see
docs/cluster.md.)  The tables are copied as they are, not re-checked
through the stores' rules: both stores share those rules, and a copy must
not lose an alias an older release accepted.

- **One transaction** on the receiving side: a copy that fails leaves it as
  it was.  Writers there are held off meanwhile (the accounts advisory lock
  in PostgreSQL, ``BEGIN IMMEDIATE`` in SQLite), and running nodes are told
  at commit like after any change.
- **Resumable**: a row the receiving side has already, the same, is
  skipped, so running the command again after an interruption (or after
  both sides were used) copies only what is missing.  A row it has with a
  *different* value (another password hash, other alias targets) stops the
  copy, naming it: nothing is overwritten.
- **Verified**: after copying, each table's rows with the source's keys are
  read back from the receiving side and compared with the source by count
  and SHA-256; the transaction commits only if they match.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postoffice.cluster.accounts import CHANNEL, MIGRATIONS
from postoffice.cluster.db import ACCOUNTS_WRITE_LOCK, ClusterError, connect, describe, migrate
from postoffice.storage.accounts import AccountError
from postoffice.storage.sqlite_accounts import BUSY_TIMEOUT_MS, SqliteAccountStore

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

Row = tuple[Any, ...]

# table: (its columns, how many of them (from the left) are the key).
# Aliases are compared as a whole (all their targets in order): one alias
# is one entry, whatever its number of rows.
TABLES: dict[str, tuple[tuple[str, ...], int]] = {
    "domains": (("name",), 1),
    "users": (("address", "password_hash", "quota", "admin"), 1),
    "aliases": (("alias", "position", "target"), 1),
    # A user's app passwords are compared as a whole, as an alias's targets.
    "app_passwords": (("address", "id", "label", "digest", "created"), 1),
}
MAX_NAMED = 5  # differing entries named in the refusal


@dataclass(frozen=True, slots=True)
class TableCopy:
    table: str
    entries: int  # in the source (aliases: aliases, not rows)
    copied: int
    present: int  # already there, the same
    checksum: str  # SHA-256 of the source's rows, as read back from the receiving side

    def line(self) -> str:
        return (
            f"{self.table}: {self.entries} in the source, {self.copied} copied,"
            f" {self.present} there already; verified, sha256 {self.checksum[:16]}"
        )


def _grouped(rows: Sequence[Row]) -> dict[Any, tuple[Row, ...]]:
    """Rows by key (the first column), each group in column order."""
    groups: dict[Any, list[Row]] = {}
    # Each column holds one type (NULL aside): positions sort as numbers.
    for row in sorted(rows, key=lambda r: tuple((1, 0) if v is None else (0, v) for v in r)):
        groups.setdefault(row[0], []).append(tuple(row))
    return {k: tuple(v) for k, v in groups.items()}


def _checksum(table: str, groups: dict[Any, tuple[Row, ...]]) -> str:
    digest = hashlib.sha256(table.encode() + b"\0")
    for key in sorted(groups, key=str):
        for row in groups[key]:
            fields = ["\\N" if v is None else str(v) for v in row]
            digest.update("\x1f".join(fields).encode() + b"\n")
    return digest.hexdigest()


class _Side:
    """One store's tables, inside the transaction the caller opened."""

    param = "?"

    def rows(self, table: str) -> list[Row]:
        raise NotImplementedError

    def insert(self, table: str, rows: Sequence[Row]) -> None:
        raise NotImplementedError

    def _select(self, table: str) -> str:
        columns, _key = TABLES[table]
        return f"SELECT {', '.join(columns)} FROM {table}"

    def _insert(self, table: str) -> str:
        columns, _key = TABLES[table]
        marks = ", ".join([self.param] * len(columns))
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


class _SqliteSide(_Side):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, table: str) -> list[Row]:
        return [tuple(r) for r in self._conn.execute(self._select(table))]

    def insert(self, table: str, rows: Sequence[Row]) -> None:
        self._conn.executemany(self._insert(table), rows)


class _PgSide(_Side):
    param = "%s"

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def rows(self, table: str) -> list[Row]:
        return [tuple(r) for r in self._conn.execute(self._select(table).encode())]

    def insert(self, table: str, rows: Sequence[Row]) -> None:
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany(self._insert(table).encode(), rows)


def _copy(source: _Side, target: _Side) -> list[TableCopy]:
    """Copy what ``target`` lacks; AccountError (the caller rolls back) when
    an entry differs or the read-back does not match."""
    report = []
    for table in TABLES:
        wanted = _grouped(source.rows(table))
        have = _grouped(target.rows(table))
        differing = [str(k) for k, rows in wanted.items() if k in have and have[k] != rows]
        if differing:
            named = ", ".join(differing[:MAX_NAMED])
            more = f" and {len(differing) - MAX_NAMED} more" if len(differing) > MAX_NAMED else ""
            raise AccountError(
                f"{table}: {named}{more} differ(s) on the receiving side; nothing was copied"
                " (change or remove them on one side, then run this again)"
            )
        missing = [k for k in wanted if k not in have]
        target.insert(table, [row for k in missing for row in wanted[k]])
        after = _grouped(target.rows(table))
        back = {k: after.get(k, ()) for k in wanted}
        checksum = _checksum(table, back)
        if len(back) != len(wanted) or checksum != _checksum(table, wanted):
            raise AccountError(f"{table}: the copy does not read back the same; nothing was copied")
        copied = len(missing)
        report.append(TableCopy(table, len(wanted), copied, len(wanted) - copied, checksum))
    return report


@contextlib.contextmanager
def _sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """The embedded accounts file, its schema current, in a write transaction."""
    SqliteAccountStore(path).close()  # made (0600) or migrated as the store does it
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise AccountError(f"accounts database {path}: {exc}") from None
    finally:
        conn.close()


@contextlib.contextmanager
def _postgres(url: str, *, receiving: bool) -> Iterator[Connection]:
    """The [cluster] database, its schema current, in a transaction that
    holds other writers off; ``receiving``: tell the running nodes at commit."""
    import psycopg

    try:
        with connect(url, autocommit=True) as conn:
            migrate(conn, "accounts", MIGRATIONS)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (ACCOUNTS_WRITE_LOCK,))
                yield conn
                if receiving:
                    conn.execute("UPDATE accounts_version SET n = n + 1")
                    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    except ClusterError as exc:
        raise AccountError(str(exc)) from None
    except psycopg.Error as exc:
        raise AccountError(f"[cluster] database: {describe(exc)}") from None


def migrate_accounts(sqlite_path: Path, url: str) -> list[TableCopy]:
    """The embedded accounts into the [cluster] database."""
    with _sqlite(sqlite_path) as lite, _postgres(url, receiving=True) as pg:
        return _copy(_SqliteSide(lite), _PgSide(pg))


def export_accounts(url: str, sqlite_path: Path) -> list[TableCopy]:
    """The [cluster] database's accounts into the embedded file."""
    with _postgres(url, receiving=False) as pg, _sqlite(sqlite_path) as lite:
        return _copy(_PgSide(pg), _SqliteSide(lite))
