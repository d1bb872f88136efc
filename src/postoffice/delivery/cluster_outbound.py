"""The outbound service of a ``[cluster]`` node: the queue in PostgreSQL.

Why: with several nodes, the node that accepted a message may die before
it is delivered; the queue lives in the database (queue/pg_store.py) and
every node's loop takes due messages from it through claims with a lease
(cluster/queue_claims.py), so any node finishes what another started.

The delivery round itself (routing, couriers, retries, DSNs) is
``Outbound``'s, unchanged; what differs is where work comes from and
where results go:

- **No schedule in memory.**  Every ``poll_interval`` (and at once after a
  message is committed here) the loop claims due rows for as many free
  slots as it has.  Due times are the database's clock; a recipient's next
  try is written as a delay from now, so nodes' clocks need not agree.
- **A claim is renewed** every third of the lease while its round runs; a
  renewal that finds the claim gone (this node stalled past its lease and
  another took the message) stops the round: nothing more is sent or
  written for it (fencing, pg_store.ClaimLost).
- **Outcomes are fenced**: the recipients' states, the DSNs' queueing and
  the message's end are written only while the claim's token is the row's.
- **A node stopped cleanly gives its claims back** (due now); one killed
  leaves them to whoever claims after the lease.

docs/cluster.md says what SMTP still makes unavoidable: a message the
remote server accepted just before this node died, before its outcome was
committed, is sent again by the next node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import socket
from collections.abc import Mapping, Sequence

from postoffice import maillog
from postoffice.cluster.db import ClusterError
from postoffice.cluster.queue_claims import MAX_BATCH, Claim
from postoffice.config.settings import Settings
from postoffice.delivery.local import LocalCourier
from postoffice.delivery.outbound import Outbound, _NewMessage
from postoffice.delivery.queue.pg_store import (
    ClaimLost,
    PgClaimedMessage,
    PgQueueStore,
    PgQueueWriter,
)
from postoffice.delivery.queue.records import QueueEntry, QueueError, RecipientState
from postoffice.delivery.queue.store import QueueStore, Released
from postoffice.delivery.remote import RemoteCourier
from postoffice.delivery.retry import retry_delay
from postoffice.mail.address import Address
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.srs import Srs
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn

log = logging.getLogger("postoffice.delivery")


def node_name() -> str:
    """This process's name in ``queue_claims.claimed_by``: unique among the
    nodes (host and process), and readable in ``queue list``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ClusterOutbound(Outbound):
    def __init__(
        self,
        settings: Settings,
        queue: PgQueueStore,
        files: QueueStore,
        remote: RemoteCourier,
        local: LocalCourier | None = None,
        *,
        srs: Srs | None = None,
        signer: DkimSigner | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        """``files``: the node's file queue, never written here (Outbound's
        own methods that use it are all replaced)."""
        super().__init__(
            settings, files, remote, local, srs=srs, signer=signer, poll_interval=poll_interval
        )
        self.queue = queue
        self._lease = settings.cluster.queue_lease
        self._claims: dict[str, Claim] = {}  # the live claim of each message worked on
        self._works: dict[str, PgClaimedMessage] = {}
        self._lost: set[str] = set()
        self._db_down = False

    # --- the interface the SMTP session uses ---------------------------------------
    # A HeadedSink (storage/sink.py) as Outbound's QueueWriter is; its users
    # (sessions, Sieve, reports) need no more than that.
    def writer(  # type: ignore[override]
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> PgQueueWriter:
        return self.queue.writer(
            sender,
            recipients,
            queue_id=queue_id,
            on_commit=self._accepted,
            dsn=dsn,
            rcpt_dsn=rcpt_dsn,
        )

    def _dsn_writer(self, recipient: Address, queue_id: str) -> _NewMessage:
        return self.queue.writer(None, [recipient], queue_id=queue_id, on_commit=self._accepted)

    def _accepted(self, entry: QueueEntry) -> None:
        traits = entry.traits
        maillog.queued(
            entry.queue_id,
            sender=entry.envelope.sender,
            nrcpt=len(entry.recipients),
            size=traits.crlf_size if traits else 0,
        )
        if self._wake is not None:
            self._wake.set()  # claim it now rather than at the next poll

    def stats(self) -> tuple[int, float | None]:
        """Messages this node works on (the shared queue: ``queue list``)."""
        return len(self._active), None

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        self._wake = asyncio.Event()
        self._connections = asyncio.Semaphore(max(1, self._relay.max_deliveries))
        with contextlib.suppress(QueueError):
            swept = await self.queue.run_blocking(self.queue.sweep_blocking)
            if swept:
                log.info("queue: %d chunk(s) of messages never committed removed", swept)
        try:
            for _ in itertools.count():  # the service loop: runs until cancelled
                free = min(self._max_active - len(self._active), MAX_BATCH)
                if free > 0:
                    for claim in await self._claim(free):
                        self._start(claim)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval):
                        await self._wake.wait()
        finally:
            tasks = list(self._active.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._give_back()
            await self._remote.close()
            with contextlib.suppress(Exception):
                await self.queue.run_blocking(self.queue.close)

    async def _claim(self, limit: int) -> list[Claim]:
        try:
            claims = await self.queue.run_blocking(self.queue.claims.claim, limit, self._lease)
        except ClusterError as exc:
            if not self._db_down:
                log.error("queue: cannot claim messages: %s", exc)
                self._db_down = True
            return []
        if self._db_down:
            log.info("queue: the [cluster] database answers again")
            self._db_down = False
        return claims

    def _start(self, claim: Claim) -> None:
        queue_id = claim.queue_id
        if queue_id in self._active:
            # Our own round's lease ended unrenewed (the database was slow or
            # away) and we claimed the message again: the round goes on under
            # the new token, which the old one no longer matches.  Never
            # start a second round of one message.
            self._claims[queue_id] = claim
            work = self._works.get(queue_id)
            if work is not None:
                work.claim = claim
            return
        self._claims[queue_id] = claim
        task = asyncio.get_running_loop().create_task(self._work(claim))
        self._active[queue_id] = task
        task.add_done_callback(functools.partial(self._finished, queue_id))

    async def _give_back(self) -> None:
        """Stopping: the claims still held are due again now, for other nodes."""
        claims, self._claims = list(self._claims.values()), {}
        for claim in claims:
            with contextlib.suppress(Exception):
                await self.queue.run_blocking(self.queue.claims.retry, claim, 0.0)

    async def _renew(self, queue_id: str, work: asyncio.Task[None]) -> None:
        period = self._lease / 3
        for _ in itertools.count():  # until the round ends (it cancels this)
            await asyncio.sleep(period)
            claim = self._claims.get(queue_id)
            if claim is None:
                return
            try:
                held = await self.queue.run_blocking(self.queue.claims.renew, claim, self._lease)
            except ClusterError as exc:
                log.warning("%s: cannot renew the claim: %s", claim.queue_id, exc)
                continue  # the lease may still hold: try again
            if not held:
                log.error("%s: claim lost (lease ended); this attempt stops", claim.queue_id)
                self._lost.add(claim.queue_id)
                work.cancel()
                return

    async def _work(self, claim: Claim) -> None:
        queue_id = claim.queue_id
        if claim.previous is not None:
            log.warning("%s: taken over from node %s (its lease ended)", queue_id, claim.previous)
        current = asyncio.current_task()
        assert current is not None
        renewer = asyncio.get_running_loop().create_task(self._renew(queue_id, current))
        try:
            work = await self.queue.claim(claim)
            if work is None:
                maillog.removed(queue_id)
                self._claims.pop(queue_id, None)
                return
            work.claim = self._claims.get(queue_id, claim)  # claimed again meanwhile: that one
            self._works[queue_id] = work
            if claim.flush:  # `queue flush`: every waiting recipient is due now
                now = self._clock()
                for r in work.entry.recipients:
                    if r.state is RecipientState.DEFERRED:
                        r.next_try = now
            await self._round(work)
            await self._send_owed_dsns(work)
            released = await work.release(self._clock)
            self._claims.pop(queue_id, None)
            if released is Released.REMOVED:
                maillog.removed(queue_id)
        except ClaimLost as exc:
            self._claims.pop(queue_id, None)
            log.warning("%s; left to that node", exc)
        except asyncio.CancelledError:
            if queue_id not in self._lost:
                raise  # stopping: _give_back hands the claim on
            self._lost.discard(queue_id)
            self._claims.pop(queue_id, None)
        except Exception as exc:  # a bug or the database: the message waits, never lost
            if isinstance(exc, QueueError | ClusterError | OSError):
                log.error("%s: queue error, will retry: %s", queue_id, exc)
            else:
                log.exception("%s: unexpected error, will retry", queue_id)
            delay = retry_delay(1, self._relay.retry_schedule)
            with contextlib.suppress(Exception):
                current_claim = self._claims.get(queue_id, claim)
                await self.queue.run_blocking(self.queue.claims.retry, current_claim, delay)
            self._claims.pop(queue_id, None)
        finally:
            self._works.pop(queue_id, None)
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer


class ClusterHandoff:
    """The outbound side of an extra smtp process of a [cluster] node: it
    queues into the database; every node's loop finds the message within
    its poll interval."""

    def __init__(self, queue: PgQueueStore) -> None:
        self.queue = queue

    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> PgQueueWriter:
        return self.queue.writer(
            sender, recipients, queue_id=queue_id, dsn=dsn, rcpt_dsn=rcpt_dsn, on_commit=None
        )
