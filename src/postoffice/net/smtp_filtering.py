"""The SMTP session's filtered path: filters asked at each stage, the message
spooled, modified and only then routed into Maildirs and the queue.

Why apart from smtp_session.py: without filters the session streams DATA
straight into its writers (the fast path, unchanged).  With [filters]
configured (filters/build.py) a message's header, body and envelope may
still change after the last byte arrived, so this module takes over the
parts that differ:

- connect/HELO/MAIL/RCPT: ask the chain after the server's own checks
  passed; a Reject or Tempfail is the reply to that command (at connect:
  the greeting, then the connection closes), Discard and Quarantine are
  remembered for the message (at connect/HELO: for every message);
- DATA: the content goes to a spool file (filters/spool.py) instead of the
  writers;
- end of data: the message stage; then the modifications (filters/apply.py),
  recipients re-resolved as RCPT would (filter-added ones may be remote
  without AUTH: the filter is trusted), the Junk folder for quarantined or
  spam-marked mail ([filters] junk_folder), writers opened and the message
  streamed into them from the spool.  The session's commit gives the 250,
  as on the fast path: on stable storage first.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import BinaryIO, Protocol

from postoffice import logfmt, maillog
from postoffice.filters.apply import (
    HEADER_READ,
    ModificationError,
    edit_envelope,
    edit_headers,
    is_spam,
    render_headers,
    split_header,
)
from postoffice.filters.chain import ChainSession, FilterChain
from postoffice.filters.interface import DeliveryReport, SessionFacts, SpooledMessage
from postoffice.filters.spool import SPOOL_DIR, SpoolWriter
from postoffice.filters.verdicts import (
    AddHeader,
    ChangeHeader,
    Discard,
    Quarantine,
    Reject,
    Tempfail,
    Verdict,
)
from postoffice.mail.address import Address, AddressError, parse_address
from postoffice.net.connection import Connection
from postoffice.net.smtp_envelope import IncomingEnvelope, Transaction, new_queue_id
from postoffice.policy.client_name import verified_client_name
from postoffice.protocol.dsn_params import NO_RECIPIENT_DSN
from postoffice.protocol.smtp_reply import Reply
from postoffice.protocol.smtp_server import MailFrom, RcptTo, SmtpServerCore
from postoffice.services import Services
from postoffice.storage import folder_names
from postoffice.storage.folders import FolderError, Folders, junk_folder_blocking
from postoffice.storage.maildir import delivery_facts
from postoffice.storage.sink import MessageSink


class FilteredSession(Protocol):
    """What this module uses of smtp_session.SmtpSession (a Protocol, so the
    two modules do not import each other)."""

    s: Services
    conn: Connection
    envelope: IncomingEnvelope
    client_ip: str
    helo: str
    mode_name: str
    core: SmtpServerCore
    user: Address | None

    def _judge_rcpt(
        self, event: RcptTo, env: IncomingEnvelope | None = None, may_relay: bool = False
    ) -> Reply: ...

    def _local_prefix(self, tx: Transaction) -> bytes: ...

    async def _write(self, tx: Transaction, data: bytes, newlines: int = -1) -> None: ...

    def _outbound_writer(self, env: IncomingEnvelope, queue_id: str) -> MessageSink[str]: ...


log = logging.getLogger("postoffice.filters")

COPY_CHUNK = 256 * 1024  # octets per read when streaming the spool into the writers
# Background "delivered" calls of one session waiting at its end, at most.
MAX_PENDING_DELIVERED = 16


def stage_reply(verdict: Verdict, stage: str) -> Reply | None:
    """A Reject/Tempfail as the SMTP reply; None for the others."""
    if not isinstance(verdict, Reject | Tempfail):
        return None
    enhanced = verdict.enhanced
    if enhanced is not None and enhanced[:1] != str(verdict.code)[:1]:
        enhanced = None  # a class that contradicts the code: the code wins
    try:
        return Reply(verdict.code, verdict.text or "refused by filter", enhanced)
    except ValueError:  # e.g. "5.x.y" out of shape: keep the code, lose the detail
        return Reply(verdict.code, verdict.text or "refused by filter")


class SessionFilters:
    """The filter side of one SMTP session (see the module docstring)."""

    def __init__(self, session: FilteredSession, chain: FilterChain) -> None:
        self.session = session
        self.chain = chain
        self.filters: ChainSession | None = None
        self.sticky: Discard | Quarantine | None = None  # said at connect/HELO: every message
        self.discard: Discard | None = None  # for the message under way
        self.quarantine: Quarantine | None = None
        self.queue_id = ""
        self.client_name = ""  # verified at connect (policy/client_name.py); "" unknown
        self._pending: set[asyncio.Task[None]] = set()

    def facts(self) -> SessionFacts:
        s = self.session
        env = s.envelope
        conn = s.conn
        return SessionFacts(
            client_address=s.client_ip,
            client_port=conn.peer[1],
            client_name=self.client_name,
            hostname=s.s.settings.hostname,
            listener=s.mode_name,
            helo=s.helo,
            tls_version=(conn.tls_version() or "") if s.core.tls else "",
            auth_user=str(s.user) if s.user is not None else "",
            queue_id=self.queue_id,
            sender=str(env.sender) if env.sender is not None else "",
        )

    def _remember(self, verdict: Verdict, *, sticky: bool = False) -> None:
        if isinstance(verdict, Discard | Quarantine) and sticky:
            self.sticky = self.sticky or verdict
        elif isinstance(verdict, Discard):
            self.discard = self.discard or verdict
        elif isinstance(verdict, Quarantine):
            self.quarantine = self.quarantine or verdict

    # --- stages before the data ------------------------------------------------------
    async def connect(self) -> Reply | None:
        """The greeting's verdict: a reply to send instead of 220 (then close)."""
        s = self.session.s
        checks = s.inbound_checks
        # Milters expect the client's name ({client_name}, rspamd's RDNS rules);
        # exempt clients are never looked up (SPEC [checks] exempt_networks).
        if s.resolver is not None and checks is not None and checks.applies(self.session.client_ip):
            self.client_name = await verified_client_name(s.resolver, self.session.client_ip)
        self.filters = await self.chain.open(self.facts())
        result = await self.filters.connect(self.facts())
        self._remember(result.verdict, sticky=True)
        return stage_reply(result.verdict, "connect")

    async def helo(self, name: str) -> Reply | None:
        assert self.filters is not None
        result = await self.filters.helo(self.facts(), name)
        self._remember(result.verdict, sticky=True)
        return stage_reply(result.verdict, "helo")

    async def mail(self, event: MailFrom) -> Reply | None:
        assert self.filters is not None
        self.discard = self.quarantine = None
        self.queue_id = new_queue_id()
        args = " ".join(k if v is None else f"{k}={v}" for k, v in event.params.items())
        sender = str(event.sender) if event.sender is not None else ""
        result = await self.filters.mail(self.facts(), sender, args)
        self._remember(result.verdict)
        reply = stage_reply(result.verdict, "mail")
        if reply is not None:
            await self.filters.abort()
        return reply

    async def rcpt(self, event: RcptTo) -> Reply | None:
        assert self.filters is not None
        args = " ".join(k if v is None else f"{k}={v}" for k, v in event.params.items())
        result = await self.filters.rcpt(self.facts(), str(event.recipient), args)
        self._remember(result.verdict)
        return stage_reply(result.verdict, "rcpt")

    def spool(self) -> SpoolWriter:
        s = self.session.s
        return SpoolWriter(s.settings.data_dir / SPOOL_DIR, s.executor)

    async def abort(self) -> None:
        self.discard = self.quarantine = None
        if self.filters is not None:
            await self.filters.abort()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self.filters is not None:
            filters, self.filters = self.filters, None
            await filters.close()

    # --- the message ---------------------------------------------------------------
    async def message(self, tx: Transaction, spool: SpoolWriter) -> Reply | None:
        """After the data: the message stage, the modifications, the routing.

        Returns a reply that ends the message here (refused, or discarded:
        250 with nothing stored), or None when ``tx`` has its writers
        filled and the session's commit decides."""
        assert self.filters is not None
        s = self.session
        loop = asyncio.get_running_loop()
        path = await spool.close()
        head = await loop.run_in_executor(s.s.executor, _read_head, path)
        fields, body_offset = split_header(head)
        env = tx.envelope
        message = SpooledMessage(
            path=path,
            headers=tuple(fields),
            body_offset=body_offset,
            size=spool.size,
            sender=str(env.sender) if env.sender is not None else "",
            recipients=tuple(str(r) for r in env.recipients),
        )
        result = await self.filters.message(self.facts(), message)
        reply = stage_reply(result.verdict, "message")
        if reply is not None:
            return reply
        self._remember(result.verdict)
        discard = self.discard or (self.sticky if isinstance(self.sticky, Discard) else None)
        if discard is not None:
            return self._discarded(tx, discard.reason or "discarded by filter")
        new_fields = fields
        for mod in result.modifications:
            if isinstance(mod, AddHeader | ChangeHeader):
                try:
                    new_fields = edit_headers(new_fields, (mod,))
                except ModificationError as exc:
                    log.warning("filter id=%s: %s: skipped", tx.queue_id, exc)
        edit = edit_envelope([str(r) for r in env.recipients], result.modifications)
        new_env = self._reroute(tx, edit.sender, edit.recipients, edit.added)
        if new_env is None:
            return self._discarded(tx, "no recipient left after filtering")
        tx.envelope = new_env
        quarantine = self.quarantine or (
            self.sticky if isinstance(self.sticky, Quarantine) else None
        )
        if quarantine is not None:
            # Right after our Received: (the first field), where a reader looks.
            new_fields = edit_headers(
                new_fields,
                (AddHeader("X-Postoffice-Quarantine", quarantine.reason, 1),),
            )
        spam = s.s.settings.filters.junk_folder and is_spam(new_fields)
        folder = edit.folder or "INBOX"
        if quarantine is not None or spam or tx.quarantine_reason:
            folder = "Junk"
        refused = await self._open_writers(tx, folder)
        if refused is not None:
            return refused
        if folder == "Junk":
            why = quarantine.reason if quarantine else tx.quarantine_reason or "spam"
            maillog.quarantined(tx.queue_id, reason=why, folder=folder)
        tx.local_prefix_done = True
        if tx.local is not None:
            await tx.local.write(s._local_prefix(tx))
        await s._write(tx, render_headers(new_fields))
        if edit.body is None:
            await self._copy(tx, path, body_offset)
        elif isinstance(edit.body, Path):
            await self._copy(tx, edit.body, 0)
        else:
            await s._write(tx, _lf(edit.body))
        tx.delivered_folder = folder
        return None

    def _discarded(self, tx: Transaction, reason: str) -> Reply:
        log.info(
            "filter discard id=%s client=%s from=%s to=%s reason=%s",
            tx.queue_id,
            self.session.client_ip,
            logfmt.path(tx.envelope.sender),
            ",".join(str(r) for r in tx.envelope.recipients) or "-",
            logfmt.field(reason),
        )
        tx.discarded = True
        return Reply(250, f"Ok: queued as {tx.queue_id}", "2.0.0")

    def _reroute(
        self, tx: Transaction, sender: str | None, recipients: list[str], added: set[str]
    ) -> IncomingEnvelope | None:
        """The envelope after the modifications, every recipient judged as
        RCPT judges it; None when none is left."""
        s = self.session
        old = tx.envelope
        same = [str(r) for r in old.recipients]
        if sender is None and recipients == same:
            return old
        new_sender = old.sender
        if sender is not None:
            try:
                new_sender = parse_address(sender, utf8=True) if sender else None
            except AddressError as exc:
                log.warning("filter id=%s: sender %r refused: %s", tx.queue_id, sender, exc)
        env = IncomingEnvelope(
            sender=new_sender,
            smtputf8=old.smtputf8,
            declared_size=old.declared_size,
            dsn=old.dsn,
        )
        for text in recipients:
            try:
                rcpt = parse_address(text, utf8=True)
            except AddressError as exc:
                log.warning("filter id=%s: recipient %r dropped: %s", tx.queue_id, text, exc)
                continue
            dsn = old.rcpt_dsn.get(rcpt, NO_RECIPIENT_DSN)
            reply = s._judge_rcpt(RcptTo(rcpt, {}, dsn), env=env, may_relay=text.lower() in added)
            if not reply.is_positive:
                log.warning(
                    "filter id=%s: recipient %s dropped: %d %s",
                    tx.queue_id,
                    logfmt.path(rcpt),
                    reply.code,
                    logfmt.field(reply.lines[0] if reply.lines else ""),
                )
        return env if env.recipients else None

    async def _open_writers(self, tx: Transaction, folder: str) -> Reply | None:
        s = self.session
        env = tx.envelope
        tx.local, tx.outbound = None, None
        if env.mailboxes:
            maildirs = s.s.maildirs
            if folder == "INBOX":
                tx.local = maildirs.writer(list(env.mailboxes), env.originals)
            else:
                paths = [maildirs.path_for(m) for m in env.mailboxes]
                loop = asyncio.get_running_loop()
                try:
                    targets = [
                        await loop.run_in_executor(s.s.executor, _folder_blocking, p, folder)
                        for p in paths
                    ]
                except (OSError, FolderError, ValueError) as exc:
                    log.error(
                        "filter id=%s: folder %r unusable, INBOX: %s", tx.queue_id, folder, exc
                    )
                    tx.local = maildirs.writer(list(env.mailboxes), env.originals)
                else:
                    # The users' Sieve scripts still run (docs/filters.md): an
                    # explicit fileinto wins, their keep leaves it in ``folder``.
                    facts = delivery_facts(list(env.mailboxes), env.originals, folder)
                    tx.local = maildirs.writer_to(targets, folders=True, facts=facts)
        if env.remote:
            if s.s.outbound is None:
                return Reply(451, "Outbound delivery is not available", "4.3.0")
            tx.outbound = s._outbound_writer(env, tx.queue_id)
        return None

    async def _copy(self, tx: Transaction, path: Path, offset: int) -> None:
        """Stream ``path`` from ``offset`` into the writers, a chunk at a time."""
        loop = asyncio.get_running_loop()
        executor = self.session.s.executor
        f: BinaryIO = await loop.run_in_executor(executor, open, path, "rb")
        try:
            await loop.run_in_executor(executor, f.seek, offset)
            while chunk := await loop.run_in_executor(executor, f.read, COPY_CHUNK):
                await self.session._write(tx, _lf(chunk) if b"\r" in chunk else chunk)
        finally:
            await loop.run_in_executor(executor, f.close)

    def delivered(self, tx: Transaction, size: int, reply: Reply) -> None:
        """After the 250: the delivered stage, in the background (the client
        is not kept waiting for it; ``close`` waits for what is left)."""
        if self.filters is None or reply.code != 250:
            return
        env = tx.envelope
        report = DeliveryReport(
            sender=str(env.sender) if env.sender is not None else "",
            local=tuple(str(m) for m in env.mailboxes),
            remote=tuple(str(r) for r in env.remote),
            folder=tx.delivered_folder,
            size=size,
            queue_id=tx.queue_id,
            discarded=tx.discarded,
        )
        if len(self._pending) >= MAX_PENDING_DELIVERED:
            log.warning("filter id=%s: delivered stage skipped: too many pending", tx.queue_id)
            return
        task = asyncio.create_task(self.filters.delivered(self.facts(), report))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_READ)


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def _folder_blocking(maildir: Path, folder: str) -> Path:
    """The Maildir of ``folder`` in the mailbox ``maildir``, made when missing."""
    if folder == "Junk":
        return junk_folder_blocking(maildir)
    name = folder_names.parse(folder)
    folders = Folders(maildir)
    if not folders.exists(name):
        try:
            folders.create(name)
        except FolderError:
            if not folders.exists(name):  # not made meanwhile by another session
                raise
    return folders.path(name)
