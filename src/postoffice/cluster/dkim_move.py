"""``postoffice cluster migrate`` / ``export`` for DKIM keys: data_dir/dkim/
and the [cluster] database's ``dkim_keys``, both ways, verified.

The same rules as the accounts' copy (cluster/move.py): what the receiving
side has already, the same, is skipped; a domain whose keys differ there
stops the copy, named, with nothing overwritten; what was copied is read
back and compared by count and SHA-256.  A domain is one entry: all its
keys (selector, algorithm, private key, active or not), so a rotation made
on one side only is a difference, never half-merged.

Into the database it is one transaction under the DKIM write lock, and the
nodes are told at commit.  Into a data dir each domain's key files are
written first and its ``keys.json`` last (atomically): a copy cut short
leaves a directory without ``keys.json``, which counts as no keys, and the
next run completes it (files there with the same key are kept).
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from postoffice.cluster.db import DKIM_WRITE_LOCK, ClusterError, describe
from postoffice.cluster.dkim_keys import CHANNEL, open_db
from postoffice.cluster.move import MAX_NAMED, TableCopy
from postoffice.policy.dkim_keys import DkimKeyError, StoredKey, all_keys, store_keys

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

Keys = dict[str, list[StoredKey]]


def _entry(keys: list[StoredKey]) -> tuple[tuple[str, str, str, bool], ...]:
    return tuple(
        sorted((k.selector, k.algorithm, hashlib.sha256(k.pem).hexdigest(), k.active) for k in keys)
    )


def _checksum(keys: Keys) -> str:
    digest = hashlib.sha256(b"dkim_keys\0")
    for domain in sorted(keys):
        for selector, algorithm, pem_hash, active in _entry(keys[domain]):
            digest.update(
                f"{domain}\x1f{selector}\x1f{algorithm}\x1f{pem_hash}\x1f{active}\n".encode()
            )
    return digest.hexdigest()


def _plan(source: Keys, target: Keys) -> list[str]:
    """The domains to copy; DkimKeyError naming those that differ."""
    differing = [d for d in source if d in target and _entry(target[d]) != _entry(source[d])]
    if differing:
        named = ", ".join(differing[:MAX_NAMED])
        more = f" and {len(differing) - MAX_NAMED} more" if len(differing) > MAX_NAMED else ""
        raise DkimKeyError(
            f"dkim_keys: {named}{more} differ(s) on the receiving side; nothing was copied"
            " (keep the keys of one side: remove the other's, then run this again)"
        )
    return [d for d in source if d not in target]


def _verify(source: Keys, back: Keys, copied: int) -> TableCopy:
    back = {d: back.get(d, []) for d in source}
    checksum = _checksum(back)
    if checksum != _checksum(source):
        raise DkimKeyError("dkim_keys: the copy does not read back the same; nothing was copied")
    return TableCopy("dkim_keys", len(source), copied, len(source) - copied, checksum)


def _db_keys(conn: Connection) -> Keys:
    keys: Keys = {}
    for domain, selector, algorithm, pem, active in conn.execute(
        "SELECT domain, selector, algorithm, private_pem, active FROM dkim_keys"
    ):
        keys.setdefault(str(domain), []).append(
            StoredKey(str(selector), str(algorithm), bytes(pem), bool(active))
        )
    return keys


def migrate_dkim(data_dir: Path, url: str) -> TableCopy:
    """data_dir/dkim/ into the [cluster] database."""
    import psycopg

    source = all_keys(data_dir)
    try:
        with open_db(url) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DKIM_WRITE_LOCK,))
            missing = _plan(source, _db_keys(conn))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO dkim_keys (domain, selector, algorithm, private_pem, active)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [
                        (d, k.selector, k.algorithm, k.pem, k.active)
                        for d in missing
                        for k in source[d]
                    ],
                )
            report = _verify(source, _db_keys(conn), len(missing))
            if missing:
                conn.execute("UPDATE dkim_version SET n = n + 1")
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    except ClusterError as exc:
        raise DkimKeyError(str(exc)) from None
    except psycopg.Error as exc:
        raise DkimKeyError(f"[cluster] database: {describe(exc)}") from None
    return report


def export_dkim(url: str, data_dir: Path) -> TableCopy:
    """The [cluster] database's DKIM keys into data_dir/dkim/."""
    import psycopg

    try:
        with open_db(url) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (DKIM_WRITE_LOCK,))
            source = _db_keys(conn)
    except ClusterError as exc:
        raise DkimKeyError(str(exc)) from None
    except psycopg.Error as exc:
        raise DkimKeyError(f"[cluster] database: {describe(exc)}") from None
    missing = _plan(source, all_keys(data_dir))
    when = datetime.datetime.now(datetime.UTC)
    for domain in missing:
        store_keys(data_dir, domain, source[domain], when)
    return _verify(source, all_keys(data_dir), len(missing))
