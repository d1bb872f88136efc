"""The ``Outbound`` service: accepts messages into the queue and delivers them.

The SMTP session calls ``writer(sender, recipients)`` and streams the
message into it; ``commit`` returns once the message is on stable storage.
``run`` is the delivery loop (the composition root runs it as a task and
cancels it at shutdown).  Per message and round, the due recipients are
grouped by destination: local domains go to the local courier (Maildirs),
every other domain gets one SMTP transaction for all its recipients.
Results update per-recipient state; temporary failures are retried on the
``[relay] retry_schedule``, permanent ones (and messages queued longer than
``give_up_after``) are returned to the sender in one DSN per round.

Crash safety, in order: a recipient's new state is written (fsync'd) after
its attempt and before anything else happens to it; a DSN is queued (under
a queue id derived from the message's, so re-creating it after a crash
replaces rather than duplicates it) before the recipients it reports are
marked bounced; a finished message is unlinked only after everything it owes
is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from postoffice import logfmt, maillog, metrics
from postoffice.config.settings import Settings
from postoffice.delivery.content import MAX_HEADER_COPY, MessageTraits, header_section
from postoffice.delivery.courier import MessageSource, Outcome, RecipientResult
from postoffice.delivery.dsn import (
    DELAYED,
    DELIVERED,
    EXPANDED,
    FAILED,
    MAX_RETURNED,
    NOTICE_SENT,
    RELAYED,
    DsnContext,
    DsnRecipient,
    build_dsn,
    summary_headers,
)
from postoffice.delivery.local import LocalCourier
from postoffice.delivery.queue.records import QueueEntry, QueueError, Recipient, RecipientState
from postoffice.delivery.queue.store import ClaimedMessage, QueueStore, Released, Unclaimed
from postoffice.delivery.queue.writer import QueueWriter
from postoffice.delivery.remote import RemoteCourier
from postoffice.delivery.retry import next_attempt, retry_delay, warning_due
from postoffice.mail.address import Address
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.srs import Srs, SrsError, is_srs
from postoffice.protocol.dsn_params import (
    DELAY,
    FAILURE,
    SUCCESS,
    MessageDsn,
    RecipientDsn,
    xtext_decode,
)

log = logging.getLogger("postoffice.delivery")

POLL_INTERVAL = 1.0  # seconds between checks for `queue flush` requests
LOCKED_RETRY = 1.0  # seconds to wait when `queue remove` holds a message's lock
RECOVERY_RETRY = 10.0  # seconds between tries to read an unreadable queue directory
EXPIRED_STATUS = "5.4.7"  # RFC 3463: delivery time expired
# An attempt's outcome as the delivery_attempts metric names it (a failure bounces).
_RESULT_NAMES = {
    Outcome.DELIVERED: "delivered",
    Outcome.DEFERRED: "deferred",
    Outcome.FAILED: "bounced",
}


class ClaimedWork(Protocol):
    """A queued message the delivery round works on: the file queue's
    ``ClaimedMessage`` (store.py), or a claim in PostgreSQL
    (queue/pg_store.py's ``PgClaimedMessage``)."""

    entry: QueueEntry

    async def traits(self) -> MessageTraits: ...

    def message(self, traits: MessageTraits) -> MessageSource: ...

    async def read_head(self, limit: int) -> bytes: ...

    async def save(self) -> None: ...


class _NewMessage(Protocol):
    """A DSN on its way into the queue (the writers' common part)."""

    async def write(self, data: bytes, newlines: int = -1) -> None: ...

    async def commit(self) -> str: ...

    async def commit_with_head(self, content: bytes, head: Callable[[bytes], bytes]) -> str: ...

    async def discard(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Group:
    local: bool
    domain: str
    recipients: tuple[Recipient, ...]


class Outbound:
    def __init__(
        self,
        settings: Settings,
        store: QueueStore,
        remote: RemoteCourier,
        local: LocalCourier | None = None,
        *,
        clock: Callable[[], float] = time.time,
        poll_interval: float = POLL_INTERVAL,
        srs: Srs | None = None,
        signer: DkimSigner | None = None,
    ) -> None:
        self._settings = settings
        self._srs = srs
        self._signer = signer  # DSNs are signed like submitted mail (dkim_sign.py)
        self._relay = settings.relay
        self.store = store
        self._remote = remote
        self._local = local
        self._clock = clock
        self._poll_interval = poll_interval
        self._entries: dict[str, QueueEntry] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._wake: asyncio.Event | None = None
        self._connections: asyncio.Semaphore | None = None
        self._per_destination: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        self._max_active = max(16, self._relay.max_deliveries * 4)

    def stats(self) -> tuple[int, float | None]:
        """Messages in the queue and the oldest one's creation time (the
        metrics scrape reads it, on the loop)."""
        oldest = min((e.envelope.created for e in self._entries.values()), default=None)
        return len(self._entries), oldest

    def reconfigure(self, settings: Settings) -> None:
        """A reload: retries, give-up and warning times, routing (the courier's)
        apply from the next attempt.  The slot counts (max_deliveries,
        max_per_destination) are the start's: reload.py keeps them."""
        self._settings = settings
        self._relay = settings.relay
        self._remote.reconfigure(settings.relay)

    # --- the interface the SMTP session uses ---------------------------------------
    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> QueueWriter:
        """A writer for one message; its ``commit`` queues it durably."""
        return self.store.writer(
            sender,
            recipients,
            queue_id=queue_id,
            on_commit=self._accepted,
            dsn=dsn,
            rcpt_dsn=rcpt_dsn,
        )

    def _accepted(self, entry: QueueEntry) -> None:
        if entry.queue_id in self._entries:
            # Start-up recovery saw the file between its rename and this call:
            # keep that one object, so the message is never worked on twice.
            return
        traits = entry.traits
        maillog.queued(
            entry.queue_id,
            sender=entry.envelope.sender,
            nrcpt=len(entry.recipients),
            size=traits.crlf_size if traits else 0,
        )
        self._entries[entry.queue_id] = entry
        self._schedule(entry.queue_id, entry.envelope.created)

    # --- scheduling -----------------------------------------------------------------------
    def _schedule(self, queue_id: str, when: float) -> None:
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, next(self._seq), queue_id))
        if self._wake is not None:
            self._wake.set()

    def _forget(self, queue_id: str) -> None:
        self._entries.pop(queue_id, None)
        self._due.pop(queue_id, None)

    def _launch_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now and len(self._active) < self._max_active:
            when, _seq, queue_id = heapq.heappop(self._heap)
            if self._due.get(queue_id) != when or queue_id in self._active:
                continue  # superseded by a later _schedule, or already running
            entry = self._entries.get(queue_id)
            if entry is None:
                continue
            del self._due[queue_id]
            task = asyncio.get_running_loop().create_task(self._process(entry))
            self._active[queue_id] = task
            task.add_done_callback(functools.partial(self._finished, queue_id))

    def _finished(self, queue_id: str, _task: asyncio.Task[None]) -> None:
        self._active.pop(queue_id, None)
        when = self._due.get(queue_id)
        if when is not None:
            # Rescheduled while it ran (a forward due now, a flush): _launch_due
            # skipped it then, so it goes back on the heap.
            heapq.heappush(self._heap, (when, next(self._seq), queue_id))
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled."""
        self._wake = asyncio.Event()
        self._connections = asyncio.Semaphore(max(1, self._relay.max_deliveries))
        recovered = await self._recover()
        waiting = [e for e in recovered if e.queue_id not in self._entries]
        for entry in waiting:
            self._entries[entry.queue_id] = entry
            due = entry.next_due()
            self._schedule(entry.queue_id, self._clock() if due is None else due)
        if waiting:
            log.info("queue: %d message(s) waiting", len(waiting))
        loop = asyncio.get_running_loop()
        next_poll = 0.0
        try:
            for _ in itertools.count():  # the service loop: runs until cancelled
                if loop.time() >= next_poll:
                    next_poll = loop.time() + self._poll_interval
                    try:
                        requests = self.store.requests
                        if await self.store.run_blocking(requests.take_flush_request_blocking):
                            self._flush()
                        await self._adopt()
                    except OSError as exc:
                        log.error("queue: cannot check for flush requests: %s", exc)
                now = self._clock()
                self._launch_due(now)
                wait = next_poll - loop.time()
                if self._heap and len(self._active) < self._max_active:
                    wait = min(wait, self._heap[0][0] - now)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.0)):
                        await self._wake.wait()
        finally:
            tasks = list(self._active.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._remote.close()

    async def _adopt(self) -> None:
        """Messages another process of this server queued (QueueHandoff)."""
        requests = self.store.requests
        for queue_id in await self.store.run_blocking(requests.take_adoption_requests_blocking):
            if queue_id in self._entries or queue_id in self._active:
                continue  # start-up recovery found it first
            try:
                entry = await self.store.run_blocking(self.store.load_blocking, queue_id)
            except (QueueError, OSError) as exc:
                log.error("queue %s: cannot load, left for the next start: %s", queue_id, exc)
                continue
            if entry is not None:
                self._accepted(entry)

    async def _recover(self) -> list[QueueEntry]:
        """Load the queue from disk; if the disk refuses, say so and keep trying
        (new messages cannot be queued either, so nothing is lost meanwhile)."""
        for attempt in itertools.count(1):  # until it works or the task is cancelled
            try:
                return await self.store.run_blocking(self.store.recover_blocking)
            except OSError as exc:
                log.error("queue: cannot read %s (try %d): %s", self.store.dir, attempt, exc)
                await asyncio.sleep(RECOVERY_RETRY)
        return []

    def _flush(self) -> None:
        """`queue flush`: every waiting recipient is due now."""
        now = self._clock()
        count = 0
        for queue_id, entry in self._entries.items():
            for r in entry.recipients:
                if r.state is RecipientState.DEFERRED:
                    r.next_try = now
            if queue_id not in self._active:
                self._schedule(queue_id, now)
                count += 1
        log.info("queue: flush requested; %d message(s) due now", count)

    # --- one message, one round -----------------------------------------------------------
    async def _process(self, entry: QueueEntry) -> None:
        queue_id = entry.queue_id
        claim: ClaimedMessage | Unclaimed | None = None
        try:
            claim = await self.store.claim(entry)
            if claim is Unclaimed.BUSY:  # `queue remove` has it right now
                self._schedule(queue_id, self._clock() + LOCKED_RETRY)
                return
            if claim is Unclaimed.GONE:
                maillog.removed(queue_id)
                self._forget(queue_id)
                return
            await self._round(claim)
            await self._send_owed_dsns(claim)
            released = await claim.release()
        except (QueueError, OSError) as exc:
            log.error("%s: queue error, will retry: %s", queue_id, exc)
            self._schedule(queue_id, self._clock() + retry_delay(1, self._relay.retry_schedule))
            return
        except Exception:  # a bug must not lose the message: log it and retry later
            log.exception("%s: unexpected error, will retry", queue_id)
            self._schedule(queue_id, self._clock() + retry_delay(1, self._relay.retry_schedule))
            return
        finally:
            if isinstance(claim, ClaimedMessage) and claim.locked:
                await claim.unlock()
        if released is Released.REMOVED:
            maillog.removed(queue_id)
        if released is not Released.KEPT:
            self._forget(queue_id)
            return
        due = entry.next_due()
        if due is not None:
            self._schedule(queue_id, due)

    async def _round(self, claim: ClaimedWork) -> None:
        entry = claim.entry
        now = self._clock()
        if now - entry.envelope.created >= self._relay.give_up_after:
            for r in entry.recipients:
                if r.pending:
                    self._expire(entry, r, now)
        due = [r for r in entry.recipients if r.pending and r.next_try <= now]
        if not due:
            return
        traits = await claim.traits()
        groups = self._groups(due)
        persist_each = len(groups) > 1
        lock = asyncio.Lock()

        async def one(group: _Group) -> None:
            started = metrics.clock()
            results = await self._deliver(entry, group, claim.message(traits))
            metrics.delivery(
                (_RESULT_NAMES[r.outcome] for r in results),
                self._destination_class(group),
                metrics.clock() - started,
            )
            async with lock:
                self._apply(entry, group, results)
                if persist_each:
                    await claim.save()

        await asyncio.gather(*(one(g) for g in groups))

    def _destination_class(self, group: _Group) -> str:
        if group.local:
            return "local"
        return "smarthost" if self._relay.smarthost is not None else "remote"

    def _groups(self, due: list[Recipient]) -> list[_Group]:
        by_key: dict[tuple[bool, str], list[Recipient]] = {}
        for r in due:
            local = self._local is not None and self._local.is_local_domain(r.address.domain)
            by_key.setdefault((local, r.address.domain), []).append(r)
        return [_Group(local, domain, tuple(rs)) for (local, domain), rs in by_key.items()]

    async def _deliver(
        self, entry: QueueEntry, group: _Group, message: MessageSource
    ) -> list[RecipientResult]:
        assert self._connections is not None
        sender = entry.envelope.sender
        addresses = [r.address for r in group.recipients]
        try:
            if group.local:
                assert self._local is not None
                return await self._local.deliver(sender, addresses, message)
            destination = self._remote.destination(group.domain)
            semaphore, users = self._per_destination.setdefault(
                destination, (asyncio.Semaphore(max(1, self._relay.max_per_destination)), [0])
            )
            users[0] += 1
            try:
                async with semaphore, self._connections:
                    return await self._remote.deliver(group.domain, sender, addresses, message)
            finally:
                users[0] -= 1
                if users[0] == 0:
                    del self._per_destination[destination]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an I/O error must not stop the queue
            log.exception("%s: delivery to %s failed unexpectedly", entry.queue_id, group.domain)
            text = f"internal error: {type(exc).__name__}"
            return [RecipientResult(a, Outcome.DEFERRED, text, "4.3.0") for a in addresses]

    def _apply(self, entry: QueueEntry, group: _Group, results: list[RecipientResult]) -> None:
        now = self._clock()
        by_address = {r.address: r for r in group.recipients}
        known = {r.address for r in entry.recipients}
        for result in results:
            r = by_address.get(result.address)
            if r is None:
                continue
            r.attempts += 1
            r.last_attempt = now
            r.last_error, r.status, r.remote = result.text, result.status, result.remote
            r.smtp_reply = result.smtp_reply
            if result.outcome is Outcome.DELIVERED:
                r.state = RecipientState.DELIVERED
                if r.dsn.wants(SUCCESS) and not r.notice:
                    r.notice = _success_action(group.local, result)
                # RFC 3461 §6.2.7.3: an alias expansion reports "expanded"
                # itself; its targets keep FAILURE/DELAY, not SUCCESS.
                inherited = RecipientDsn(
                    None if r.dsn.notify is None else r.dsn.notify - {SUCCESS}, r.dsn.orcpt
                )
                for target in result.forwards:
                    if target not in known:  # aliases: forward through the queue
                        known.add(target)
                        entry.recipients.append(Recipient(target, next_try=now, dsn=inherited))
            elif result.outcome is Outcome.FAILED:
                r.state = RecipientState.FAILED
            else:
                when = next_attempt(
                    now,
                    r.attempts,
                    entry.envelope.created,
                    self._relay.retry_schedule,
                    self._relay.give_up_after,
                )
                if when is None:
                    self._expire(entry, r, now)
                else:
                    r.state, r.next_try = RecipientState.DEFERRED, when
            self._log_attempt(entry, r, result, now)

    def _expire(self, entry: QueueEntry, r: Recipient, now: float) -> None:
        r.state = RecipientState.FAILED
        r.status = EXPIRED_STATUS
        r.last_error = (
            f"delivery time expired after {(now - entry.envelope.created) / 3600:.1f} hours"
            + (f"; last error: {r.last_error}" if r.last_error else "")
        )
        r.smtp_reply = False
        maillog.expired(entry.queue_id, recipient=r.address, status=r.status)

    def _log_attempt(
        self, entry: QueueEntry, r: Recipient, result: RecipientResult, now: float
    ) -> None:
        # One line per recipient per attempt (queue id, recipient, host, reply, result, delay).
        maillog.attempt(
            entry.queue_id,
            recipient=r.address,
            relay=result.remote or ("local" if result.outcome is Outcome.DELIVERED else "none"),
            delay=now - entry.envelope.created,
            tries=r.attempts,
            result=r.state.value,
            status=result.status,
            reply=result.text,  # the remote server's words
        )

    # --- after the round: the DSNs it owes ---------------------------------------------
    async def _send_owed_dsns(self, claim: ClaimedWork) -> None:
        """Queue a failure DSN for recipients that failed, a delay warning when
        one is due, and success notices, each as the recipients' NOTIFY asks
        (RFC 3461 §4.1); mark them done.  The caller then persists."""
        entry = claim.entry
        now = self._clock()
        failed = [r for r in entry.recipients if r.state is RecipientState.FAILED]
        if failed:
            wanted = [r for r in failed if r.dsn.wants(FAILURE)]
            if entry.envelope.sender is None:
                # A bounce that cannot be delivered is dropped: never bounce a bounce.
                maillog.bounced(entry.queue_id, sender=None, kind="failed", notice=None)
            elif wanted:
                await self._send_dsn(claim, wanted, now, FAILED, f"b{entry.dsn_count}")
                entry.dsn_count += 1
            for r in failed:
                r.state = RecipientState.BOUNCED
        deferred = [
            r for r in entry.recipients if r.state is RecipientState.DEFERRED and r.dsn.wants(DELAY)
        ]
        if (
            deferred
            and entry.envelope.sender is not None
            and warning_due(now, entry.envelope.created, self._relay.warn_after, entry.warned)
        ):
            await self._send_dsn(claim, deferred, now, DELAYED, "w")
            entry.warned = True
        for action in (DELIVERED, RELAYED, EXPANDED):
            owed = [r for r in entry.recipients if r.notice == action]
            if not owed:
                continue
            if entry.envelope.sender is not None:  # never a notice to <> (RFC 3461 §6.2)
                await self._send_dsn(claim, owed, now, action, f"s{entry.dsn_count}")
                entry.dsn_count += 1
            for r in owed:
                r.notice = NOTICE_SENT

    async def _send_dsn(
        self, claim: ClaimedWork, recipients: list[Recipient], now: float, action: str, tag: str
    ) -> None:
        """Queue one notice of ``action`` under the derived id ``<id>-<tag>``."""
        delayed = action == DELAYED
        entry = claim.entry
        sender = entry.envelope.sender
        assert sender is not None
        sender, forwarded = self._bounce_address(entry, sender)
        if sender is None:
            return
        # RET=FULL returns the whole message with a failure (RFC 3461 §4.3),
        # never forwarded mail's (backscatter, dsn.py).
        full = action == FAILED and entry.envelope.dsn.ret == "FULL" and not forwarded
        head = await claim.read_head((MAX_RETURNED if full else MAX_HEADER_COPY) + 2)
        original = header_section(head)
        ctx = DsnContext(
            reporting_mta=self._settings.hostname,
            queue_id=entry.queue_id,
            sender=sender,
            arrival=entry.envelope.created,
            original_headers=summary_headers(original) if forwarded else original,
            envid=xtext_decode(entry.envelope.dsn.envid),
            original_message=head if full and len(head) <= MAX_RETURNED else None,
        )
        report = [
            DsnRecipient(
                r.address,
                r.status if action in (FAILED, DELAYED) else "2.0.0",
                r.last_error,
                r.smtp_reply,
                r.remote,
                r.last_attempt,
                r.dsn.original_recipient(),
            )
            for r in recipients
        ]
        retry_until = entry.envelope.created + self._relay.give_up_after if delayed else None
        data = build_dsn(ctx, report, now=now, action=action, retry_until=retry_until)
        # A derived queue id: re-making this DSN after a crash replaces it.
        writer = self._dsn_writer(sender, f"{entry.queue_id}-{tag}")
        try:
            if self._signer is None:
                await writer.write(data)
                dsn_id = await writer.commit()
            else:  # signed with our domain's key, as submitted mail is
                dsn_id = await writer.commit_with_head(data, self._signer.sign_blocking)
        except BaseException:
            await writer.discard()
            raise
        maillog.bounced(entry.queue_id, sender=sender, kind=action, notice=dsn_id)

    def _dsn_writer(self, recipient: Address, queue_id: str) -> _NewMessage:
        return self.store.writer(None, [recipient], queue_id=queue_id, on_commit=self._accepted)

    def _bounce_address(self, entry: QueueEntry, sender: Address) -> tuple[Address | None, bool]:
        """Where a DSN for ``entry`` goes, and whether the message was
        forwarded mail (its sender one of our SRS addresses): then the DSN
        goes straight to the original sender and quotes only a summary of the
        header (dsn.py).  Our own queue is trusted, so the address's age is
        not checked: a message may wait longer than SRS bounces are taken."""
        local = self._local is not None and self._local.is_local_domain(sender.domain)
        if self._srs is None or not local or not is_srs(sender.local):
            return sender, False
        try:
            return self._srs.reverse(sender, check_age=False), True
        except SrsError as exc:  # the secret it was made with is gone
            log.warning(
                "%s: no DSN: cannot reverse from=%s reason=%s",
                entry.queue_id,
                logfmt.path(sender),
                logfmt.field(exc),
            )
            return None, True


def _success_action(local: bool, result: RecipientResult) -> str:
    """The success notice a delivered recipient that asked for one is owed
    (RFC 3464 §2.3.3): "delivered" into a mailbox, "expanded" by an alias,
    "relayed" to a hop without DSN, none when the hop took NOTIFY itself."""
    if local:
        return EXPANDED if result.forwards else DELIVERED
    return "" if result.peer_dsn else RELAYED


class QueueHandoff:
    """The outbound side of an extra smtp process: it queues messages durably
    like the server does, then hands each to the delivering server (which
    picks it up at its next poll, within POLL_INTERVAL) instead of sending."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store

    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> QueueWriter:
        return self.store.writer(
            sender,
            recipients,
            queue_id=queue_id,
            on_commit=self._hand_off,
            dsn=dsn,
            rcpt_dsn=rcpt_dsn,
        )

    async def _hand_off(self, entry: QueueEntry) -> None:
        try:
            requests = self.store.requests
            await self.store.run_blocking(requests.request_adoption_blocking, entry.queue_id)
        except OSError as exc:  # queued durably all the same: the next start sends it
            log.error("queue %s: cannot hand over for delivery: %s", entry.queue_id, exc)
