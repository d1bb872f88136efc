"""The outbound queue in PostgreSQL, for nodes with ``[cluster] database``.

Why: several nodes must share one queue, so that mail accepted by a node
that then dies is delivered by another (docs/cluster.md, "The outbound
queue").  The embedded queue (store.py, files under ``queue_dir``) is not
touched by any of this; ``ClusterOutbound`` (delivery/cluster_outbound.py)
uses this store in its place.

What a message is stays the same (records.py): the envelope is the JSON
line the file queue writes first in ``<id>.msg``, the recipients' states
the JSON of ``<id>.json``; here they are two columns of ``queue_messages``.
The message itself is ``queue_bodies`` rows of at most ``SPILL_THRESHOLD``
octets and a bit, written while it arrives (memory stays bounded whatever
its size) under a body number nothing refers to yet.  The commit (the 250)
is one transaction: the last chunk, the ``queue_messages`` row pointing at
the body and the ``queue_claims`` row (cluster/queue_claims.py) that makes
it due.  Bodies of messages never committed (a client gone, a node killed
while receiving) are swept at start once a day old.

Who works on a message is decided by ``queue_claims``: every write a node
makes about a message it claimed (the recipients' states, the message's
end, its next due time) happens in a transaction that first checks, with
the row locked, that the claim's fencing token is still the row's; when it
is not, the node lost the message to another one and writes nothing
(``ClaimLost``).

Blocking methods end in ``_blocking`` and run in the executor (the CLI calls
them directly); each uses a connection of a small pool of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

from postoffice.cluster.db import ClusterError, connect, describe
from postoffice.cluster.queue_claims import Claim, QueueClaims
from postoffice.delivery.content import MessageTraits, TraitScanner
from postoffice.delivery.queue.records import (
    QueueEntry,
    QueueError,
    StoredEnvelope,
    new_queue_id,
)
from postoffice.delivery.queue.store import Released, Removal
from postoffice.delivery.queue.writer import SPILL_THRESHOLD, OnCommit
from postoffice.mail.address import Address
from postoffice.mail.folding import LineFolder
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

_T = TypeVar("_T")

POOL_SIZE = 8  # connections one node keeps for the queue (writers, outcomes)
POOL_WAIT = 30.0  # seconds a caller waits for a free connection before failing (451)
UNSCHEDULED_RETRY = 300.0  # seconds; see PgClaimedMessage.release
ORPHAN_AGE = "1 day"  # bodies never committed are swept once this old


class ClaimLost(QueueError):
    """Another node holds the message now (this node's lease ended): this
    one must write nothing about it."""


class _Pool:
    """A few connections, each used by one thread at a time; broken ones are
    replaced on the next use."""

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._free = threading.BoundedSemaphore(size)
        self._mutex = threading.Lock()
        self._idle: list[Connection] = []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection inside one transaction; QueueError if the database
        fails (the transaction is then rolled back)."""
        import psycopg

        if not self._free.acquire(timeout=POOL_WAIT):
            raise QueueError("the [cluster] database is busy (no free connection)")
        conn: Connection | None = None
        try:
            with self._mutex:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed or conn.broken:
                try:
                    conn = connect(self._url, autocommit=True)
                except ClusterError as exc:
                    conn = None
                    raise QueueError(str(exc)) from None
            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                raise QueueError(f"[cluster] queue: {describe(exc)}") from None
        finally:
            if conn is not None and not conn.closed and not conn.broken:
                with self._mutex:
                    self._idle.append(conn)
            self._free.release()

    def close(self) -> None:
        with self._mutex:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PgQueueStore:
    """The queue's rows for one node (``node``: its name among the nodes)."""

    def __init__(self, url: str, node: str, executor: Executor) -> None:
        self.node = node
        self._executor = executor
        # Migrates the "queue" component (claims and messages) on first use.
        self.claims = QueueClaims(url, node)
        self._pool = _Pool(url, POOL_SIZE)

    async def run_blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self.claims.close()
        self._pool.close()

    # --- writing new messages ----------------------------------------------------
    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        on_commit: OnCommit | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> PgQueueWriter:
        if not recipients:
            raise ValueError("a queued message needs at least one recipient")
        unique = tuple(dict.fromkeys(recipients))
        envelope = StoredEnvelope(
            queue_id=queue_id or new_queue_id(),
            sender=sender,
            recipients=unique,
            created=time.time(),
            dsn=dsn or MessageDsn(),
            rcpt_dsn=tuple(rcpt_dsn.get(r, RecipientDsn()) for r in unique) if rcpt_dsn else (),
        )
        return PgQueueWriter(envelope, self, on_commit)

    def new_body_blocking(self) -> int:
        with self._pool.transaction() as conn:
            row = conn.execute(b"SELECT nextval('queue_body_ids')").fetchone()
        assert row is not None
        return int(row[0])

    def write_chunk_blocking(self, body: int, seq: int, data: bytes) -> None:
        with self._pool.transaction() as conn:
            conn.execute(
                b"INSERT INTO queue_bodies (body, seq, data) VALUES (%s, %s, %s)",
                (body, seq, data),
            )

    def commit_blocking(
        self, envelope: StoredEnvelope, body: int, seq: int, last: bytes, size: int
    ) -> None:
        """The message's last chunk, its row and its claim row, in one
        transaction.  A message under the same id (a DSN made again after a
        crash: its id is derived) is replaced, as the file queue's rename does."""
        with self._pool.transaction() as conn:
            # A whole message handed over at once (a DKIM-signed one) is cut
            # into chunks too: readers fetch one chunk at a time.
            pieces = [last[i : i + SPILL_THRESHOLD] for i in range(0, len(last), SPILL_THRESHOLD)]
            if pieces or seq == 0:
                with conn.cursor() as cur:
                    cur.executemany(
                        b"INSERT INTO queue_bodies (body, seq, data) VALUES (%s, %s, %s)",
                        [(body, seq + i, piece) for i, piece in enumerate(pieces or [b""])],
                    )
            old = conn.execute(
                b"SELECT body FROM queue_messages WHERE queue_id = %s FOR UPDATE",
                (envelope.queue_id,),
            ).fetchone()
            if old is not None:
                conn.execute(b"DELETE FROM queue_bodies WHERE body = %s", (old[0],))
            conn.execute(
                b"INSERT INTO queue_messages (queue_id, envelope, state, body, size)"
                b" VALUES (%s, %s, NULL, %s, %s)"
                b" ON CONFLICT (queue_id) DO UPDATE SET envelope = EXCLUDED.envelope,"
                b" state = NULL, body = EXCLUDED.body, size = EXCLUDED.size",
                (envelope.queue_id, envelope.header_line(), body, size),
            )
            conn.execute(
                b"INSERT INTO queue_claims (queue_id, due) VALUES (%s, now())"
                b" ON CONFLICT (queue_id) DO UPDATE SET due = now()",
                (envelope.queue_id,),
            )

    def drop_body_blocking(self, body: int) -> None:
        """The chunks of a message that was not committed.  A commit whose
        answer was lost (the connection broke) may have happened all the
        same: a body a message row refers to is kept."""
        with self._pool.transaction() as conn:
            conn.execute(
                b"DELETE FROM queue_bodies WHERE body = %s"
                b" AND NOT EXISTS (SELECT 1 FROM queue_messages WHERE body = %s)",
                (body, body),
            )

    def sweep_blocking(self) -> int:
        """Bodies of messages never committed, older than ORPHAN_AGE: gone."""
        with self._pool.transaction() as conn:
            cur = conn.execute(
                b"DELETE FROM queue_bodies b WHERE written < now() - %s::interval"
                b" AND NOT EXISTS (SELECT 1 FROM queue_messages m WHERE m.body = b.body)",
                (ORPHAN_AGE,),
            )
            return int(cur.rowcount)

    # --- reading -------------------------------------------------------------------
    def load_blocking(self, queue_id: str) -> tuple[QueueEntry, int, int, bool] | None:
        """(the entry, its body number, its size, whether `queue remove` asked
        for it), or None if it is gone."""
        with self._pool.transaction() as conn:
            row = conn.execute(
                b"SELECT envelope, state, body, size, removal FROM queue_messages"
                b" WHERE queue_id = %s",
                (queue_id,),
            ).fetchone()
        if row is None:
            return None
        return _entry(bytes(row[0]), row[1], queue_id), int(row[2]), int(row[3]), bool(row[4])

    def chunk_blocking(self, body: int, seq: int) -> bytes | None:
        """Chunk ``seq`` of a body; None past its end."""
        with self._pool.transaction() as conn:
            row = conn.execute(
                b"SELECT data FROM queue_bodies WHERE body = %s AND seq = %s", (body, seq)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def entries_blocking(self) -> Iterator[tuple[QueueEntry, int]]:
        """Every queued message with its size, for ``queue list``."""
        with self._pool.transaction() as conn:
            rows = conn.execute(
                b"SELECT queue_id, envelope, state, size FROM queue_messages ORDER BY queue_id"
            ).fetchall()
        for queue_id, envelope, state, size in rows:
            try:
                entry = _entry(bytes(envelope), state, str(queue_id))
            except QueueError:
                continue
            yield entry, int(size)

    def holders_blocking(self) -> dict[str, str]:
        """queue id -> the node holding a live claim on it (``queue list``)."""
        with self._pool.transaction() as conn:
            rows = conn.execute(
                b"SELECT queue_id, claimed_by FROM queue_claims"
                b" WHERE claimed_by IS NOT NULL AND lease_until >= now()"
            ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    # --- outcomes, under the claim's fencing token -----------------------------
    def _hold(self, conn: Connection, claim: Claim) -> None:
        """Lock the claim row; ClaimLost unless it is still ``claim``."""
        row = conn.execute(
            b"SELECT 1 FROM queue_claims WHERE queue_id = %s AND token = %s AND claimed_by = %s"
            b" FOR UPDATE",
            (claim.queue_id, claim.token, self.node),
        ).fetchone()
        if row is None:
            raise ClaimLost(f"{claim.queue_id}: claim lost to another node")

    def save_blocking(self, claim: Claim, state: bytes) -> None:
        with self._pool.transaction() as conn:
            self._hold(conn, claim)
            conn.execute(
                b"UPDATE queue_messages SET state = %s WHERE queue_id = %s",
                (state, claim.queue_id),
            )

    def release_blocking(self, claim: Claim, state: bytes | None, delay: float) -> Released:
        """End the claim: the new ``state`` and the next attempt ``delay``
        seconds from now (now, if `queue flush` asked meanwhile), or
        (``state`` None) the message gone for good.  A removal `queue remove`
        asked for meanwhile wins."""
        with self._pool.transaction() as conn:
            self._hold(conn, claim)
            row = conn.execute(
                b"SELECT removal FROM queue_messages WHERE queue_id = %s", (claim.queue_id,)
            ).fetchone()
            removed = row is None or bool(row[0])
            if removed or state is None:
                _delete(conn, claim.queue_id)
                return Released.REMOVED if removed else Released.FINISHED
            conn.execute(
                b"UPDATE queue_messages SET state = %s WHERE queue_id = %s",
                (state, claim.queue_id),
            )
            conn.execute(
                b"UPDATE queue_claims SET claimed_by = NULL, lease_until = NULL,"
                b" due = CASE WHEN flush THEN now() ELSE now() + make_interval(secs => %s) END"
                b" WHERE queue_id = %s",
                (max(delay, 0.0), claim.queue_id),
            )
            return Released.KEPT

    # --- administration (CLI, on any node) ------------------------------------------
    def remove_blocking(self, queue_id: str) -> Removal:
        """``queue remove``: at once, or when the attempt holding it ends."""
        with self._pool.transaction() as conn:
            claim = conn.execute(
                b"SELECT claimed_by IS NOT NULL AND lease_until >= now() FROM queue_claims"
                b" WHERE queue_id = %s FOR UPDATE",
                (queue_id,),
            ).fetchone()
            found = conn.execute(
                b"SELECT 1 FROM queue_messages WHERE queue_id = %s FOR UPDATE", (queue_id,)
            ).fetchone()
            if found is None:
                return Removal.MISSING
            if claim is not None and claim[0]:
                conn.execute(
                    b"UPDATE queue_messages SET removal = true WHERE queue_id = %s", (queue_id,)
                )
                return Removal.REQUESTED
            _delete(conn, queue_id)
            return Removal.REMOVED

    def flush_blocking(self) -> int:
        """``queue flush``: every message due now, each waiting recipient
        with it (the node that claims it next is told); the count."""
        with self._pool.transaction() as conn:
            cur = conn.execute(b"UPDATE queue_claims SET flush = true, due = LEAST(due, now())")
            return int(cur.rowcount)

    async def claim(self, claim: Claim) -> PgClaimedMessage | None:
        """Load a claimed message; None (its claim dropped) if it is gone or
        `queue remove` asked for it (then it goes now)."""
        loaded = await self.run_blocking(self.load_blocking, claim.queue_id)
        if loaded is None:
            await self.run_blocking(self.claims.done, claim)
            return None
        entry, body, size, removal = loaded
        if removal:
            await self.run_blocking(self.release_blocking, claim, None, 0.0)
            return None
        return PgClaimedMessage(self, claim, entry, body, size)


def _delete(conn: Connection, queue_id: str) -> None:
    """A message, its body and its claim row, in the caller's transaction."""
    row = conn.execute(
        b"DELETE FROM queue_messages WHERE queue_id = %s RETURNING body", (queue_id,)
    ).fetchone()
    if row is not None:
        conn.execute(b"DELETE FROM queue_bodies WHERE body = %s", (row[0],))
    conn.execute(b"DELETE FROM queue_claims WHERE queue_id = %s", (queue_id,))


def _entry(envelope: bytes, state: Any, queue_id: str) -> QueueEntry:
    try:
        entry = QueueEntry.new(StoredEnvelope.parse(envelope), 0)
    except (ValueError, KeyError, TypeError) as exc:
        raise QueueError(f"{queue_id}: bad envelope: {exc}") from None
    if state is not None:
        entry.state_on_disk = True
        with contextlib.suppress(ValueError, KeyError, TypeError):
            # Unreadable cannot happen short of corruption: retry everyone then.
            entry.apply_state(bytes(state))
    return entry


class PgQueueWriter:
    """One message on its way into the PostgreSQL queue (a ``HeadedSink``,
    storage/sink.py); writes what it holds as a chunk whenever it holds
    SPILL_THRESHOLD octets, like the file queue's writer spills to disk."""

    def __init__(self, envelope: StoredEnvelope, store: PgQueueStore, on_commit: OnCommit | None):
        self.envelope = envelope
        self.on_commit = on_commit
        self._store = store
        self._buffer = bytearray()
        self._scanner = TraitScanner()
        self._folder = LineFolder()
        self._body: int | None = None
        self._seq = 0
        self._size = 0
        self._closed = False

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    async def write(self, data: bytes, newlines: int = -1) -> None:
        if self._closed:
            raise RuntimeError("writer already committed or discarded")
        data = self._folder.feed(data)
        self._scanner.feed(data)
        self._buffer += data
        if len(self._buffer) >= SPILL_THRESHOLD:
            chunk = bytes(self._buffer)
            self._buffer.clear()
            await self._store.run_blocking(self._spill_blocking, chunk)

    def _spill_blocking(self, chunk: bytes) -> None:
        if self._body is None:
            self._body = self._store.new_body_blocking()
        self._store.write_chunk_blocking(self._body, self._seq, chunk)
        self._seq += 1
        self._size += len(chunk)

    def _commit_blocking(self, chunk: bytes, head: Callable[[bytes], bytes] | None) -> None:
        if head is not None:
            chunk = self._folder.feed(chunk)
            top = head(chunk)
            self._scanner.feed(top)
            self._scanner.feed(chunk)
            chunk = top + chunk
        if self._body is None:
            self._body = self._store.new_body_blocking()
        self._store.commit_blocking(
            self.envelope, self._body, self._seq, chunk, self._size + len(chunk)
        )

    async def commit(self) -> str:
        if self._closed:
            raise RuntimeError("writer already committed or discarded")
        self._closed = True
        chunk = bytes(self._buffer)
        self._buffer.clear()
        return await self._commit(chunk, None)

    async def commit_with_head(self, content: bytes, head: Callable[[bytes], bytes]) -> str:
        if self._closed or self._body is not None or self._buffer:
            raise RuntimeError("commit_with_head needs a fresh writer")
        self._closed = True
        return await self._commit(content, head)

    async def _commit(self, chunk: bytes, head: Callable[[bytes], bytes] | None) -> str:
        try:
            await self._store.run_blocking(self._commit_blocking, chunk, head)
        except BaseException:
            await self._drop()
            raise
        entry = QueueEntry.new(self.envelope, 0, self._scanner.traits())
        if self.on_commit is not None:
            result = self.on_commit(entry)
            if result is not None:
                await result
        return self.queue_id

    async def discard(self) -> None:
        self._closed = True
        self._buffer.clear()
        await self._drop()

    async def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            # Best effort: what is left is swept at a start (sweep_blocking).
            with contextlib.suppress(QueueError):
                await self._store.run_blocking(self._store.drop_body_blocking, body)


class PgQueuedMessage:
    """A claimed message as couriers read it (``MessageSource``): its chunks,
    one query each, from the start every time."""

    def __init__(
        self,
        store: PgQueueStore,
        body: int,
        size: int,
        traits: MessageTraits,
        entry: QueueEntry,
    ) -> None:
        self._store = store
        self._body = body
        self._size = size
        self._traits = traits
        self.dsn = entry.envelope.dsn
        self._rcpt_dsn = {r.address: r.dsn for r in entry.recipients if r.dsn.given}

    @property
    def traits(self) -> MessageTraits:
        return self._traits

    def recipient_dsn(self, address: Address) -> RecipientDsn:
        return self._rcpt_dsn.get(address, RecipientDsn())

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        async for chunk in _body_chunks(self._store, self._body, self._size):
            yield chunk


async def _body_chunks(
    store: PgQueueStore, body: int, size: int, limit: int | None = None
) -> AsyncGenerator[bytes, None]:
    """The chunks of a body of ``size`` octets; QueueError (rather than a
    short message sent) if they do not add up to it.  ``limit``: stop once
    that many octets are read."""
    read = 0
    # Bounded by the body's chunk count: each pass reads one more.
    for seq in range(1 << 31):
        if limit is not None and read >= limit:
            return
        chunk = await store.run_blocking(store.chunk_blocking, body, seq)
        if chunk is None:
            break
        read += len(chunk)
        if chunk:
            yield chunk
    if read != size:
        raise QueueError(f"queued message body {body}: {read} octets stored, {size} expected")


class PgClaimedMessage:
    """A queued message this node holds a claim on (the ``ClaimedWork`` the
    delivery round uses: outbound.py)."""

    def __init__(
        self, store: PgQueueStore, claim: Claim, entry: QueueEntry, body: int, size: int
    ) -> None:
        self.claim = claim
        self.entry = entry
        self._store = store
        self._body = body
        self._size = size

    async def traits(self) -> MessageTraits:
        if self.entry.traits is None:
            scanner = TraitScanner()
            async for chunk in _body_chunks(self._store, self._body, self._size):
                scanner.feed(chunk)
            self.entry.traits = scanner.traits()
        return self.entry.traits

    def message(self, traits: MessageTraits) -> PgQueuedMessage:
        return PgQueuedMessage(self._store, self._body, self._size, traits, self.entry)

    async def read_head(self, limit: int) -> bytes:
        head = bytearray()
        async for chunk in _body_chunks(self._store, self._body, self._size, limit):
            head += chunk[: limit - len(head)]
        return bytes(head)

    async def save(self) -> None:
        """The recipients' states, now; ClaimLost if another node has it."""
        self.entry.state_on_disk = True
        await self._store.run_blocking(
            self._store.save_blocking, self.claim, self.entry.state_json()
        )

    async def release(self, clock: Callable[[], float]) -> Released:
        """End the claim: the message gone once nothing is owed, else its new
        state, due again at its next recipient's time (``clock``: the time
        those are written in)."""
        entry = self.entry
        if entry.done:
            state, delay = None, 0.0
        else:
            due = entry.next_due()
            # Nothing due but something owed (a DSN that could not be queued):
            # look again later, as the file queue does at its next start.
            delay = UNSCHEDULED_RETRY if due is None else due - clock()
            state = entry.state_json()
        return await self._store.run_blocking(
            functools.partial(self._store.release_blocking, self.claim, state, delay)
        )
