"""Which node works on which queued message: claims with a lease, in PostgreSQL.

The scheduling half of the cluster queue (docs/cluster.md, "The outbound
queue"); delivery/cluster_outbound.py drives it, delivery/queue/pg_store.py
keeps the messages (its tables are this component's second migration, so
the "queue" schema has one version).  Each queued message has a
row keyed by its queue id with the time of its next attempt.  A node takes
due rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` (nodes asking at the
same moment get different rows and never wait for each other) and marks
them claimed for a lease, in one short transaction that commits before any
SMTP conversation starts: no row lock is held across the network.

- **Times are the database's** (``now()``): nodes whose clocks differ still
  agree on when a lease ends and a message is due.
- **A lease ends** unless renewed; then any node may claim the row again.
  A node killed mid-delivery so hands its messages on after at most one
  lease.
- **Fencing**: every claim bumps the row's ``token``.  ``renew`` and
  ``finish`` act only while the token is still the claim's, so a node that
  stalled past its lease (and whose row another node took) learns it lost
  the claim and must not write an outcome.  Within a lease, then, nothing
  is delivered twice; what SMTP itself leaves open (a 250 received just
  before the node died, before ``finish`` committed: the next claimer sends
  again) is stated in docs/cluster.md.

Blocking, like every call on the database here: the server calls it from
its worker threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postoffice.cluster.db import ClusterError, connect, describe, migrate

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

MIGRATIONS = (
    """
    CREATE TABLE queue_claims (
        queue_id text PRIMARY KEY,      -- the message's queue id (delivery/queue/records.py)
        due timestamptz NOT NULL,       -- its next attempt
        claimed_by text,                -- the node working on it; NULL: nobody
        lease_until timestamptz,        -- that claim's end unless renewed
        token bigint NOT NULL DEFAULT 0 -- counts claims (fencing)
    );
    CREATE INDEX queue_claims_due ON queue_claims (due)
    """,
    # The messages themselves (delivery/queue/pg_store.py): the envelope and
    # the recipients' states as the file queue writes them (records.py), the
    # message in chunks written while it arrives.
    """
    CREATE SEQUENCE queue_body_ids;
    CREATE TABLE queue_bodies (
        body bigint NOT NULL,           -- a message's number (queue_body_ids)
        seq integer NOT NULL,           -- chunk order, from 0
        data bytea NOT NULL,
        written timestamptz NOT NULL DEFAULT now(),  -- uncommitted ones are swept
        PRIMARY KEY (body, seq)
    );
    CREATE TABLE queue_messages (
        queue_id text PRIMARY KEY,
        envelope bytea NOT NULL,        -- StoredEnvelope.header_line()
        state bytea,                    -- QueueEntry.state_json(); NULL: as it arrived
        body bigint NOT NULL,           -- its chunks in queue_bodies
        size bigint NOT NULL,           -- octets of the message (LF form)
        removal boolean NOT NULL DEFAULT false  -- `queue remove` asked during an attempt
    );
    ALTER TABLE queue_claims
        ADD COLUMN flush boolean NOT NULL DEFAULT false;  -- `queue flush`: retry all now
    CREATE INDEX queue_messages_body ON queue_messages (body)
    """,
)

MAX_BATCH = 1000  # rows one claim may take


@dataclass(frozen=True, slots=True)
class Claim:
    queue_id: str
    token: int
    previous: str | None  # the node whose expired claim this one took over, if any
    flush: bool = False  # `queue flush` asked since: every waiting recipient is due now


class QueueClaims:
    """Claims on queued messages for ``node`` (a name unique among the nodes)."""

    def __init__(self, url: str, node: str) -> None:
        if not node:
            raise ValueError("a node needs a name")
        self.node = node
        self._url = url
        self._mutex = threading.Lock()
        self._conn: Connection | None = None
        with self._mutex:
            migrate(self._connection(), "queue", MIGRATIONS)

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self._url, autocommit=True)
        return self._conn

    def _run(self, statement: bytes, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; its rows.  ClusterError if it fails."""
        import psycopg

        with self._mutex:
            try:
                conn = self._connection()
                with conn.transaction():
                    cur = conn.execute(statement, params)
                    return list(cur.fetchall()) if cur.description else []
            except psycopg.Error as exc:
                raise ClusterError(f"[cluster] queue: {describe(exc)}") from None

    def add(self, queue_id: str, delay: float = 0.0) -> None:
        """A message to deliver ``delay`` seconds from now (again: unchanged)."""
        self._run(
            b"INSERT INTO queue_claims (queue_id, due)"
            b" VALUES (%s, now() + make_interval(secs => %s)) ON CONFLICT (queue_id) DO NOTHING",
            (queue_id, delay),
        )

    def claim(self, limit: int, lease: float) -> list[Claim]:
        """Up to ``limit`` due messages nobody holds (or whose lease ended),
        oldest due first, claimed for ``lease`` seconds."""
        if not 0 < limit <= MAX_BATCH or lease <= 0:
            raise ValueError(f"limit 1-{MAX_BATCH} and a positive lease, not {limit}, {lease}")
        rows = self._run(
            b"WITH picked AS ("
            b"  SELECT queue_id, claimed_by, flush FROM queue_claims"
            b"  WHERE due <= now() AND (lease_until IS NULL OR lease_until < now())"
            b"  ORDER BY due LIMIT %s FOR UPDATE SKIP LOCKED"
            b") UPDATE queue_claims q"
            b" SET claimed_by = %s, lease_until = now() + make_interval(secs => %s),"
            b"     token = q.token + 1, flush = false"
            b" FROM picked WHERE q.queue_id = picked.queue_id"
            b" RETURNING q.queue_id, q.token, picked.claimed_by, q.due, picked.flush",
            (limit, self.node, lease),
        )
        rows.sort(key=lambda r: (r[3], r[0]))  # RETURNING keeps no order: oldest due first
        return [
            Claim(str(r[0]), int(r[1]), None if r[2] is None else str(r[2]), bool(r[4]))
            for r in rows
        ]

    def renew(self, claim: Claim, lease: float) -> bool:
        """Extend the claim to ``lease`` seconds from now; False: it was lost."""
        rows = self._run(
            b"UPDATE queue_claims SET lease_until = now() + make_interval(secs => %s)"
            b" WHERE queue_id = %s AND token = %s AND claimed_by = %s RETURNING 1",
            (lease, claim.queue_id, claim.token, self.node),
        )
        return bool(rows)

    def done(self, claim: Claim) -> bool:
        """Nothing is owed any more: the row goes.  False: the claim was lost
        (another node has the message now; this one must not act on it)."""
        rows = self._run(
            b"DELETE FROM queue_claims WHERE queue_id = %s AND token = %s AND claimed_by = %s"
            b" RETURNING 1",
            (claim.queue_id, claim.token, self.node),
        )
        return bool(rows)

    def retry(self, claim: Claim, delay: float) -> bool:
        """Give the message back, due again in ``delay`` seconds; False: lost."""
        rows = self._run(
            b"UPDATE queue_claims SET due = now() + make_interval(secs => %s),"
            b" claimed_by = NULL, lease_until = NULL"
            b" WHERE queue_id = %s AND token = %s AND claimed_by = %s RETURNING 1",
            (delay, claim.queue_id, claim.token, self.node),
        )
        return bool(rows)

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
