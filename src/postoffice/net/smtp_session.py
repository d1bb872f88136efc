"""The SMTP session: drives the sans-I/O core over a Connection and decides.

The core (``protocol/smtp_server.py``) parses and keeps the command sequence;
this module answers each event: who may send to whom (``policy/relay.py``),
authentication, and where the message goes (Maildirs, the outbound queue).
Replies to pipelined commands are collected and written in one go before the
session waits for more input (RFC 2920 §3.1).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from postoffice import logfmt, maillog, metrics
from postoffice.filters.spool import SpoolWriter
from postoffice.mail.address import Address, AddressError
from postoffice.mail.headers import MAX_HEADER_BLOCK, HeaderGate, count_fields, trace_headers
from postoffice.net.connection import Connection, ConnectionClosed, ShuttingDown, WriteTimeout
from postoffice.net.smtp_envelope import IncomingEnvelope, Transaction, new_queue_id
from postoffice.net.smtp_filtering import SessionFilters
from postoffice.net.smtp_tally import CommandTally
from postoffice.policy.auth import LoginThrottled
from postoffice.policy.clients import may_send_password
from postoffice.policy.relay import (
    SRS_ALONE,
    SRS_MAX_MESSAGE,
    SRS_TOO_BIG,
    RecipientVerdict,
    judge_recipient,
    sender_allowed,
    server_postmaster,
)
from postoffice.policy.srs import forwarding_sender
from postoffice.protocol import sasl
from postoffice.protocol.dsn_params import SUCCESS
from postoffice.protocol.smtp_reply import Reply
from postoffice.protocol.smtp_server import (
    Auth,
    AuthResponse,
    ChunkComplete,
    ChunkStart,
    DataChunk,
    DataComplete,
    DataRequested,
    Event,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rejected,
    Reset,
    SmtpServerCore,
    StartTls,
    Verify,
)
from postoffice.services import Services
from postoffice.storage.errors import DeliveryError, StorageFault, fault_of
from postoffice.storage.folders import junk_folder_blocking
from postoffice.storage.maildir import delivery_facts
from postoffice.storage.sink import HeadedSink, MessageSink

log = logging.getLogger("postoffice.smtp")

# The replies of every transaction, made once.
_OK = Reply(250, "Ok", "2.0.0")
_OK_SENDER = Reply(250, "Ok", "2.1.0")
_OK_RECIPIENT = Reply(250, "Ok", "2.1.5")
_GO_AHEAD = Reply(354, "End data with <CR><LF>.<CR><LF>")
_NO_SPACE = Reply(452, "Insufficient system storage", "4.3.1")
_LOCAL_ERROR = Reply(451, "Local error in processing", "4.3.0")
# Its Maildir failed a delivery just now (maildir.UNAVAILABLE_SECONDS): this
# recipient waits, the message's other recipients do not (RFC 3463 X.2.0).
_MAILBOX_UNAVAILABLE = Reply(450, "Mailbox unavailable, try again later", "4.2.0")

TLS_HANDSHAKE_TIMEOUT = 30.0
# RFC 5321 §6.3: a message that has passed this many relays is looping.
MAX_HOPS = 100


class SmtpMode(enum.Enum):
    RELAY_IN = "smtp"  # port 25: mail for local domains only, no AUTH
    SUBMISSION = "submission"  # 587/465: AUTH required, may send anywhere


class SmtpSession:
    def __init__(self, services: Services, conn: Connection, mode: SmtpMode) -> None:
        self.s = services
        self.conn = conn
        self.mode = mode
        limits = services.settings.limits
        self.core = SmtpServerCore(
            max_message_size=limits.max_message_size, max_text_line=limits.max_line_length
        )
        self.core.tls = conn.tls  # implicit TLS (465): no STARTTLS to offer
        # A client that pipelines and never reads its replies is cut off like a
        # silent one (RFC 5321 §4.5.3.2.7): every drain gives up after this.
        conn.write_timeout = limits.smtp_timeout
        self.client_ip = conn.peer[0]
        self.helo = ""
        self.user: Address | None = None
        self.envelope = IncomingEnvelope()
        self.tx: Transaction | None = None
        self.out: list[bytes] = []
        self._sasl: sasl.SaslExchange | None = None  # an AUTH exchange under way
        self._start_tls = False
        self._checks_apply: bool | None = None  # inbound checks for this client (once)
        # Errors (5xx replies) since the session began or last had a message
        # accepted, and the seconds it has been held back for them.
        self.errors = 0
        self._error_delays = 0.0
        # For the record the session ends with (_log_session).
        self.implicit_tls = conn.tls
        # 465 is submission over implicit TLS: "submissions" (RFC 8314 §7.3).
        self.mode_name = "submissions" if conn.tls and mode is SmtpMode.SUBMISSION else mode.value
        self.tally = CommandTally()
        self.outcome = "dropped"  # until the session learns better
        self.reason = ""  # e.g. why the TLS handshake failed
        self.last_command = "CONNECT"  # Postfix's "lost connection after ..."
        self.data_bytes = 0  # content octets of the message being received
        self.first_helo = ""  # the name given before STARTTLS, if any
        self._chunk_failure: Reply | None = None  # a BDAT transaction that could not open
        chain = services.filters
        self.filtering = SessionFilters(self, chain) if chain else None

    # --- the loop --------------------------------------------------------------
    async def run(self) -> None:
        hostname = self.s.settings.hostname
        greeting = Reply(220, f"{hostname} ESMTP postoffice")
        if self.filtering is not None:
            try:
                refused = await self.filtering.connect()
            except BaseException:
                await self.filtering.close()
                raise
            if refused is not None:
                # Refused at connect: said in place of the greeting, then closed.
                self.conn.write(self.core.send_unsolicited(refused))
                self.outcome = "refused by filter"
                self._log_session(False)
                await self.filtering.close()
                return
        self.conn.write(self.core.send_unsolicited(greeting))
        limits = self.s.settings.limits
        clock = asyncio.get_running_loop().time
        # The timeouts bound a whole line, not the gap between two bytes: a
        # client that dribbles a byte at a time (slowloris) is cut off like a
        # silent one.  RFC 5321 §4.5.3.2.7 waits for the next command.
        line_deadline: float | None = None
        try:
            while not self.core.closed:
                timeout = limits.smtp_data_timeout if self.tx else limits.smtp_timeout
                if line_deadline is None:
                    line_deadline = clock() + timeout
                try:
                    data = await self.conn.read(
                        max(0.0, line_deadline - clock()), interruptible=self.tx is None
                    )
                except ShuttingDown:
                    self.conn.write(
                        self.core.send_unsolicited(
                            Reply(421, f"{hostname} Service shutting down", "4.3.2")
                        )
                    )
                    self.outcome = "shutdown"
                    break
                except TimeoutError:
                    self.conn.write(
                        self.core.send_unsolicited(
                            Reply(421, f"{hostname} Error: timeout exceeded", "4.4.2")
                        )
                    )
                    self.outcome = "timeout"
                    break
                if b"\n" in data:
                    line_deadline = None
                self.core.receive_data(data)
                await self._process_events()
                if self.out:
                    self.conn.write(b"".join(self.out))
                    self.out.clear()
                    await self.conn.drain()
                if self._start_tls:
                    self._start_tls = False
                    if not await self._handshake():
                        break
        except WriteTimeout:
            self.outcome = "write timeout"
        except (ConnectionClosed, ConnectionError):
            self.outcome = "dropped"
        except Exception as exc:  # never the whole server
            self.outcome, self.reason = "error", str(exc) or type(exc).__name__
        finally:
            in_data = self.tx is not None
            if in_data:
                await self._abandon()
            if self.filtering is not None:
                await self.filtering.close()
            self._log_session(in_data)

    async def _handshake(self) -> bool:
        """The TLS handshake after our 220 to STARTTLS; False (the session
        ends) when it fails or cannot start."""
        if self.conn.unread:
            # Sent before the client can have read our 220 (our write waited
            # on a client that does not read): RFC 3207 §4.2 forbids it, and it
            # cannot be a ClientHello we may use.  Close at once, not after
            # a handshake that would wait 30 s for a hello already thrown away.
            self.outcome = "data after STARTTLS"
            return False
        try:
            await self.conn.start_tls(self.s.tls, TLS_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError, ConnectionClosed) as exc:  # ssl.SSLError is an OSError
            self.outcome = "TLS handshake failed"
            self.reason = str(exc) or ("timeout" if isinstance(exc, TimeoutError) else "closed")
            return False
        self.tally.succeeded("starttls")
        return True

    async def _process_events(self) -> None:
        while (event := self.core.next_event()) is not None:
            if isinstance(event, DataChunk):
                self.data_bytes += len(event.data)
                await self._data_chunk(event.data, event.newlines)
                continue
            if isinstance(event, ChunkStart):
                await self._chunk_start()
                continue
            verb = _verb(event)
            if verb:
                self.tally.given(verb)
                self.last_command = verb.upper()
            if await self._hold_back():
                reply = await self._answer(event)
            else:
                reply = self._too_many_errors()
                self.outcome = "too many errors"
            self.out.append(self.core.send(reply))
            if not reply.is_positive and not isinstance(event, DataComplete | ChunkComplete):
                # After the data the message's own count says it (_data_end).
                metrics.smtp_refused(self.conn.listener, verb, reply.code, reply.enhanced)
            if self.tx is not None and not self.core.in_transaction:
                # EHLO or STARTTLS between BDAT chunks ended the transaction.
                await self._abandon()
            self._tally_reply(event, reply)
            if self._count_error(event, reply):
                # The 421 follows the reply that reached the limit at once:
                # the rest of a pipelined batch is never answered (closing the
                # core drops it).
                self.out.append(self.core.send_unsolicited(self._too_many_errors()))
                self.outcome = "too many errors"
            if isinstance(event, StartTls) and reply.code == 554:
                # Data followed STARTTLS before our reply (RFC 3207 §4.2):
                # refused, and nothing after it is read (_starttls).
                self.core.close()
                self.outcome = "data after STARTTLS"
                return
            if isinstance(event, StartTls) and reply.code == 220:
                self._start_tls = True
                # RFC 3207 §4.2: forget everything learnt before TLS, login included.
                self.user = None
                self._sasl = None
                self.helo = ""
                return  # nothing after STARTTLS is read as plaintext (RFC 3207 §4.2)
            if self.core.closed:
                return

    def _tally_reply(self, event: Event, reply: Reply) -> None:
        """Count a command that succeeded (``smtp_tally``): DATA when its
        message is accepted, AUTH at its 235, STARTTLS after the handshake
        (_handshake), a refusal never, the rest at a 2xx."""
        code = reply.code
        if isinstance(event, DataComplete):
            verb, ok = "data", code == 250
        elif isinstance(event, ChunkComplete):
            verb, ok = "bdat", code == 250
        elif isinstance(event, Auth | AuthResponse):
            verb, ok = "auth", code == 235
        elif isinstance(event, DataRequested | StartTls | Rejected):
            if isinstance(event, DataRequested) and code == 354:
                self.data_bytes = 0  # a message begins
            return
        else:
            verb, ok = _verb(event), 200 <= code < 300
            if isinstance(event, Quit) and code == 221:
                self.outcome = "quit"
        if ok and verb:
            self.tally.succeeded(verb)

    def _log_session(self, in_data: bool) -> None:
        """One record for the whole session, however it ended (Postfix's
        "disconnect from ..." with its command counts, and "lost connection
        after DATA (N bytes)"); ``in_data``: it ended inside a message."""
        after = ""
        if self.outcome != "quit":
            inside = "BDAT" if self.core.chunking else "DATA"  # Postfix says so too
            after = f" after={inside if in_data else self.last_command}"
            if in_data:
                after += f" bytes={self.data_bytes}"
        reason = f" reason={logfmt.field(self.reason)}" if self.reason else ""
        log.info(
            "smtp session mode=%s client=%s helo=%s tls=%s user=%s end=%s%s%s %s",
            self.mode_name,
            self.client_ip,
            logfmt.field(self.helo or self.first_helo or "-"),
            self._tls_field(),
            logfmt.field(self.user or "-"),
            logfmt.field(self.outcome),
            after,
            reason,
            self.tally.summary(),
        )

    def _tls_field(self) -> str:
        """As POP3's records say it: implicit (465), stls, or no."""
        if self.implicit_tls:
            return "implicit"
        return "stls" if self.conn.tls else "no"  # the core's says so from the 220 on

    # --- errors (Postfix's smtpd_soft/hard_error_limit) -------------------------------
    async def _hold_back(self) -> bool:
        """Past ``soft_errors``, wait ``error_delay`` before answering (an
        asyncio sleep: other sessions go on).  The waits of one session add up
        to at most ``smtp_timeout``, so they never hold a connection slot
        longer than an idle client could; False once that is spent."""
        limits = self.s.settings.limits
        if self.errors < limits.soft_errors or limits.error_delay <= 0:
            return True
        if self._error_delays + limits.error_delay > limits.smtp_timeout:
            log.warning("smtp too many errors client=%s errors=%d", self.client_ip, self.errors)
            return False
        self._error_delays += limits.error_delay
        await asyncio.sleep(limits.error_delay)
        return True

    def _count_error(self, event: Event, reply: Reply) -> bool:
        """Count a 5xx (a bad command, an unknown or refused recipient, ...);
        True when the session has reached ``max_errors`` and must close."""
        if isinstance(event, DataComplete | ChunkComplete) and reply.code == 250:
            self.errors = 0  # a delivered message forgives earlier errors, as in Postfix
        elif reply.code >= 500:
            self.errors += 1
        if self.errors < self.s.settings.limits.max_errors or self.core.closed:
            return False
        log.warning("smtp too many errors client=%s errors=%d", self.client_ip, self.errors)
        return True

    def _too_many_errors(self) -> Reply:
        return Reply(421, f"{self.s.settings.hostname} Too many errors, closing", "4.7.0")

    # --- answers -------------------------------------------------------------------
    async def _answer(self, event: Event) -> Reply:
        match event:
            case Rejected(reply=reply):
                return reply
            case Hello():
                reply = self._hello(event)
                if self.filtering is not None and reply.is_positive:
                    reply = await self.filtering.helo(event.name) or reply
                return reply
            case MailFrom():
                reply = self._mail(event)
                if self.filtering is not None and reply.is_positive:
                    refused = await self.filtering.mail(event)
                    if refused is not None:
                        self.envelope = IncomingEnvelope()
                        return refused
                return reply
            case RcptTo():
                return await self._filtered_rcpt(event)
            case DataRequested():
                return await self._data_start()
            case DataComplete():
                return await self._data_end(event)
            case ChunkComplete():
                return await self._chunk_end(event)
            case Reset():
                await self._abandon()
                self.envelope = IncomingEnvelope()
                if self.filtering is not None:
                    await self.filtering.abort()
                return _OK
            case Noop():
                return _OK
            case Quit():
                return Reply(221, f"{self.s.settings.hostname} Bye", "2.0.0")
            case Verify():
                # RFC 5321 §3.5.3: 252 rather than confirm or deny addresses.
                return Reply(
                    252, "Cannot VRFY user, but will accept message for local users", "2.5.2"
                )
            case Help():
                return Reply(214, "See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)", "2.0.0")
            case StartTls():
                if self.core.buffered or self.conn.unread:
                    # RFC 3207 §4.2: the client must wait for our 220.  What it
                    # sent meanwhile (commands, or its ClientHello) is never
                    # executed, nor waited for in a handshake that would hang:
                    # refused, said so, and closed at once, as POP3 does for STLS.
                    return Reply(554, "Nothing may follow STARTTLS before the handshake", "5.5.1")
                return Reply(220, "Ready to start TLS", "2.0.0")
            case Auth():
                return await self._auth(event)
            case AuthResponse():
                return await self._auth_step(event.line)
        return Reply(500, "Command not recognized", "5.5.1")

    def _hello(self, event: Hello) -> Reply:
        self.helo = event.name
        self.first_helo = self.first_helo or event.name
        self.envelope = IncomingEnvelope()
        hostname = self.s.settings.hostname
        if not event.extended:
            return Reply(250, hostname)
        lines = [
            f"{hostname} greets {event.name}",
            "PIPELINING",
            f"SIZE {self.s.settings.limits.max_message_size}",
            "8BITMIME",
            "CHUNKING",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",  # RFC 3461
        ]
        if not self.core.tls:
            lines.append("STARTTLS")
        else:
            lines.append("REQUIRETLS")  # RFC 8689 §4: only on a TLS session
        if self.mode is SmtpMode.SUBMISSION and self._auth_allowed() and not self.user:
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        return Reply(250, tuple(lines))

    def _auth_allowed(self) -> bool:
        return may_send_password(
            self.core.tls, self.client_ip, self.s.settings.auth.allow_plaintext_loopback
        )

    def _mail(self, event: MailFrom) -> Reply:
        limit = self.s.settings.limits.max_message_size
        if event.size is not None and event.size > limit:
            return Reply(552, f"Message size exceeds fixed limit of {limit} octets", "5.3.4")
        if self.mode is SmtpMode.SUBMISSION:
            if self.user is None:
                return Reply(530, "Authentication required", "5.7.0")
            if not sender_allowed(self.s.accounts, self.user, event.sender):
                return Reply(553, f"Sender address not owned by user {self.user}", "5.7.1")
        if self.s.space is not None and self.s.space.low(event.size or 0):
            # Postfix's queue_minfree: refused before the data, not after (RFC 1870 §6.1).
            return _NO_SPACE
        self.envelope = IncomingEnvelope(
            sender=event.sender,
            smtputf8=event.smtputf8,
            declared_size=event.size or 0,
            dsn=event.dsn,
        )
        return _OK_SENDER

    def _rcpt(self, event: RcptTo) -> Reply:
        reply = self._judge_rcpt(event)
        if not reply.is_positive:
            # Postfix-style "NOQUEUE: reject" line: refusals are what admins grep for.
            log.info(
                "smtp reject mode=%s client=%s helo=%s from=%s to=%s result=%d %s %s",
                self.mode_name,
                self.client_ip,
                logfmt.field(self.helo or "-"),
                logfmt.path(self.envelope.sender),
                logfmt.path(event.recipient),
                reply.code,
                reply.enhanced or "",
                logfmt.field(reply.lines[0] if reply.lines else ""),
            )
        return reply

    async def _filtered_rcpt(self, event: RcptTo) -> Reply:
        if self.filtering is None:
            return self._rcpt(event)
        env = self.envelope
        # What the server's own RCPT adds, to take back if a filter refuses it.
        before = (
            dict(env.mailboxes),
            dict(env.remote),
            list(env.recipients),
            dict(env.rcpt_dsn),
            env.forwarded_by,
            env.srs_bounce,
        )
        reply = self._rcpt(event)
        if not reply.is_positive:
            return reply
        refused = await self.filtering.rcpt(event)
        if refused is None:
            return reply
        (
            env.mailboxes,
            env.remote,
            env.recipients,
            env.rcpt_dsn,
            env.forwarded_by,
            env.srs_bounce,
        ) = before
        return refused

    def _judge_rcpt(
        self, event: RcptTo, env: IncomingEnvelope | None = None, may_relay: bool = False
    ) -> Reply:
        """RCPT's verdict, its recipient added to ``env`` (the session's by
        default; net/smtp_filtering.py re-routes a filtered envelope with
        it, ``may_relay`` for recipients a filter added)."""
        env = self.envelope if env is None else env
        if len(env.recipients) >= self.s.settings.limits.max_recipients:
            return Reply(452, "Too many recipients", "4.5.3")
        rcpt = event.recipient
        if rcpt.domain == "":  # bare <postmaster> (RFC 5321 §4.1.1.3)
            rcpt = server_postmaster(self.s)
        verdict = judge_recipient(
            self.s,
            rcpt,
            may_relay=may_relay or (self.mode is SmtpMode.SUBMISSION and self.user is not None),
            null_sender=env.sender is None,
        )
        match verdict:
            case RecipientVerdict(reply=Reply() as reply):
                return reply
            case RecipientVerdict(mailboxes=mailboxes, remote=remote):
                if remote and self.s.outbound is None:
                    return Reply(451, "Outbound delivery is not available", "4.3.0")
                if env.srs_bounce or (verdict.srs_bounce and env.recipients):
                    return SRS_ALONE  # its size cap must not refuse anyone else's copy
                if verdict.srs_bounce and env.declared_size > SRS_MAX_MESSAGE:
                    return SRS_TOO_BIG  # RFC 1870 §6.1: refused before the data
                if any(self.s.maildirs.unavailable(m) for m in mailboxes):
                    return _MAILBOX_UNAVAILABLE
                full = self._full_mailboxes(mailboxes, env.declared_size)
                if full:
                    mailboxes = tuple(m for m in mailboxes if m not in full)
                    if not mailboxes and not remote:
                        # RFC 3463 4.2.2: the owner can make room; the sender retries.
                        return Reply(452, "Mailbox full, try again later", "4.2.2")
                    # An alias: its other members get their copies, as a list
                    # server's would; the full member's is skipped, and logged.
                    for m in full:
                        log.warning(
                            "smtp quota skip client=%s alias=%s member=%s"
                            ' reason="mailbox full: this copy is not delivered"',
                            self.client_ip,
                            logfmt.path(rcpt),
                            logfmt.path(m),
                        )
                # NOTIFY=SUCCESS for a mailbox here: delivered through the
                # queue, whose local courier says "delivered" (delivery/dsn.py).
                notify = event.dsn.wants(SUCCESS) and self.s.outbound is not None
                for m in mailboxes:
                    if notify:
                        env.remote[m] = None
                    else:
                        env.mailboxes[m] = None
                        env.originals.setdefault(m, rcpt)
                for r in (*remote, *mailboxes) if event.dsn.given else ():
                    env.rcpt_dsn.setdefault(r, event.dsn)  # the first RCPT naming it decides
                for r in remote:
                    env.remote[r] = None
                env.recipients.append(rcpt)
                env.forwarded_by = env.forwarded_by or verdict.forwarded_by
                env.srs_bounce = verdict.srs_bounce
        return _OK_RECIPIENT

    async def _data_start(self) -> Reply:
        env = self.envelope
        filtering = self.filtering
        queue_id = filtering.queue_id if filtering is not None else new_queue_id()
        spool = None
        try:
            if filtering is not None:
                # Writers are opened once the filters have had their say.
                local, outbound, spool = None, None, filtering.spool()
            else:
                local = (
                    self.s.maildirs.writer(list(env.mailboxes), env.originals)
                    if env.mailboxes
                    else None
                )
                outbound = self._outbound_writer(env, queue_id) if env.remote else None
        except (AddressError, ValueError) as exc:
            log.error("smtp cannot start delivery id=%s: %s", queue_id, exc)
            return _LOCAL_ERROR
        received = trace_headers(
            helo=self.helo,
            client_ip=self.client_ip,
            hostname=self.s.settings.hostname,
            protocol=self._protocol_name(),
            queue_id=queue_id,
            recipient=env.recipients[0] if len(env.recipients) == 1 else None,
            tls=self.conn.tls_version() if self.core.tls else None,
        )
        self.tx = Transaction(
            envelope=env,
            queue_id=queue_id,
            local=local,
            outbound=outbound,
            gate=HeaderGate(
                received=received,
                submission=self.mode is SmtpMode.SUBMISSION,
                hostname=self.s.settings.hostname,
                hold_all=self._inbound_checks_apply(),
            ),
            started=time.monotonic(),
            spool=spool,
        )
        return _GO_AHEAD

    def _outbound_writer(self, env: IncomingEnvelope, queue_id: str) -> MessageSink[str]:
        """The queue's writer for ``env.remote``; submitted mail is DKIM-signed
        on its way (signed once, here: dkim_sign.py)."""
        queued = self._queue_writer(env, queue_id)
        signer = self.s.dkim_signer
        if self.mode is SmtpMode.SUBMISSION and signer is not None:
            return signer.wrap(queued)
        return queued

    def _queue_writer(self, env: IncomingEnvelope, queue_id: str) -> HeadedSink:
        queue = self.s.outbound
        if queue is None:  # cannot be: RCPT refuses remote recipients then
            raise ValueError("no outbound queue")
        return queue.writer(
            self._queue_sender(env),
            list(env.remote),
            queue_id=queue_id,
            dsn=env.dsn,
            rcpt_dsn=env.rcpt_dsn,
        )

    def _queue_sender(self, env: IncomingEnvelope) -> Address | None:
        """The envelope sender the outbound copy leaves with: an SRS address
        when an alias forwards someone else's mail off-site (policy/srs.py)."""
        if not env.forwarded_by:
            return env.sender
        return forwarding_sender(self.s.srs, env.sender, env.forwarded_by, self.s.is_local_domain)

    def _inbound_checks_apply(self) -> bool:
        if self._checks_apply is None:  # the client address is the session's: judge once
            checks = self.s.inbound_checks
            self._checks_apply = (
                checks is not None
                and self.mode is SmtpMode.RELAY_IN
                and checks.applies(self.client_ip)
            )
        return self._checks_apply

    def _protocol_name(self) -> str:
        # RFC 3848 "with" keywords.
        name = "UTF8SMTP" if self.envelope.smtputf8 else "ESMTP"
        if self.core.tls:
            name += "S"
        if self.user is not None:
            name += "A"
        return name

    async def _data_chunk(self, data: bytes, newlines: int = -1) -> None:
        tx = self.tx
        if tx is None or tx.failure is not None:
            return
        if tx.envelope.srs_bounce:
            tx.srs_bytes += len(data)
            if tx.srs_bytes > SRS_MAX_MESSAGE:
                tx.failure = SRS_TOO_BIG  # answered after the final dot; nothing more stored
                return
        if tx.gate.hold_all:
            if not self.s.held_messages.take(len(data)):
                tx.failure = Reply(452, "Insufficient system storage, try again later", "4.3.1")
                log.warning("smtp id=%s: memory for held messages exhausted", tx.queue_id)
                self._release_held(tx)
                return
            tx.held_bytes += len(data)
        out = tx.gate.feed(data)
        if out:
            # Passed through untouched: the decoder's LF count still holds.
            await self._write_or_fail(tx, out, newlines if out is data else -1)

    def _release_held(self, tx: Transaction) -> None:
        self.s.held_messages.give_back(tx.held_bytes)
        tx.held_bytes = 0
        tx.gate.hold_all = False

    async def _write_or_fail(self, tx: Transaction, data: bytes, newlines: int = -1) -> None:
        """Write, or remember why not: a full disk mid-DATA is answered (452)
        after the final dot like any other verdict (RFC 5321 §4.1.1.4), and
        the rest of the message is read and dropped."""
        try:
            await self._write(tx, data, newlines)
        except (DeliveryError, OSError) as exc:
            tx.failure = _storage_reply(fault_of(exc))
            log.error("smtp delivery failed id=%s: %s", tx.queue_id, exc)

    async def _write(self, tx: Transaction, data: bytes, newlines: int = -1) -> None:
        if tx.spool is not None:
            await tx.spool.write(data, newlines)
            return
        if tx.local is not None:
            if not tx.local_prefix_done:
                tx.local_prefix_done = True
                await tx.local.write(self._local_prefix(tx))
            await tx.local.write(data, newlines)
        if tx.outbound is not None:
            await tx.outbound.write(data, newlines)

    def _local_prefix(self, tx: Transaction) -> bytes:
        env = tx.envelope
        sender = str(env.sender) if env.sender else ""
        lines = [f"Return-Path: <{sender}>\n"]
        if len(env.mailboxes) == 1 and not env.remote:
            # Only for a single mailbox: one linked file cannot name several
            # recipients without disclosing Bcc recipients to each other.
            lines.append(f"Delivered-To: {next(iter(env.mailboxes))}\n")
        return "".join(lines).encode("utf-8")

    async def _data_end(self, event: DataComplete) -> Reply:
        tx = self.tx
        assert tx is not None
        reply = tx.failure or self._content_verdict(event, tx)
        if reply is None and tx.gate.hold_all:
            reply = await self._judge_inbound(tx)
        if tx.held_bytes:
            self._release_held(tx)
        if reply is None:
            rest = tx.gate.finish(tx.extra_headers)
            if rest:
                await self._write_or_fail(tx, rest)
            reply = tx.failure
        if reply is None and tx.spool is not None:
            reply = await self._filter_message(tx, tx.spool)
        if reply is None:
            reply = await self._over_quota(tx)
        if reply is None:
            reply = await self._sieve_reject(tx)
        commit_seconds = None
        if reply is None:
            # Shielded: a shutdown that cancels this session mid-commit must not
            # discard writers a worker thread is already storing.
            self.tx = None  # the commit owns the writers now, not the session's cleanup
            started = metrics.clock()
            reply = await asyncio.shield(self._commit(tx, event.size))
            commit_seconds = metrics.clock() - started
            if self.filtering is not None:
                self.filtering.delivered(tx, event.size, reply)
        else:
            await self._abandon()
            if self.filtering is not None and tx.discarded:
                self.filtering.delivered(tx, event.size, reply)  # said 250: filters learn so
            elif self.filtering is not None:
                await self.filtering.abort()
        metrics.smtp_message(
            self.conn.listener, reply.code, reply.enhanced, event.size, commit_seconds
        )
        self._log_transaction(tx, event.size, reply)
        self.tx = None
        self.envelope = IncomingEnvelope()
        return reply

    async def _filter_message(self, tx: Transaction, spool: SpoolWriter) -> Reply | None:
        """With [filters]: the message stage and routing (net/smtp_filtering.py);
        the spool file is gone after it, whatever the outcome."""
        assert self.filtering is not None
        tx.spool = None  # from here on _write fills the real writers
        try:
            return await self.filtering.message(tx, spool)
        except (DeliveryError, OSError) as exc:
            log.error("smtp delivery failed id=%s: %s", tx.queue_id, exc)
            return _storage_reply(fault_of(exc))
        except (AddressError, ValueError) as exc:  # as _data_start: no writer for it
            log.error("smtp cannot start delivery id=%s: %s", tx.queue_id, exc)
            return _LOCAL_ERROR
        finally:
            await spool.discard()

    # --- BDAT (RFC 3030) --------------------------------------------------------------
    async def _chunk_start(self) -> None:
        """A BDAT chunk's content follows: the first of a transaction opens
        it as DATA's 354 would (the same writers, signer and header gate)."""
        self.last_command = "BDAT"
        if self.tx is not None or self._chunk_failure is not None:
            return
        reply = await self._data_start()
        if reply.code == 354:
            self.data_bytes = 0  # a message begins
        else:
            self._chunk_failure = reply  # the answer once the chunk is read

    async def _chunk_end(self, event: ChunkComplete) -> Reply:
        """The answer to one BDAT chunk.  The last one ends the message through
        DATA's end path (checks, commit: the 250 means it is on stable
        storage); a chunk that fails the message ends it there too, so the
        log and the metrics see it once (RFC 3030 §2: no more chunks come)."""
        if self._chunk_failure is not None:
            reply, self._chunk_failure = self._chunk_failure, None
            self.envelope = IncomingEnvelope()
            # Refused before any of the data was taken: BDAT's own refusal.
            metrics.smtp_refused(self.conn.listener, "bdat", reply.code, reply.enhanced)
            return reply
        tx = self.tx
        assert tx is not None  # _chunk_start opened it
        if event.last or tx.failure is not None or event.content.oversize:
            return await self._data_end(event.content)
        return Reply(250, f"{event.size} octets received", "2.0.0")

    def _full_mailboxes(self, mailboxes: tuple[Address, ...], incoming: int) -> list[Address]:
        """At RCPT, only what is known cheaply (storage/quota.py): the
        mailboxes at their quota, or without room for a declared SIZE= (or a
        size they lacked room for lately)."""
        quota = self.s.quota
        if quota is None:
            return []
        try:
            return [m for m in mailboxes if quota.full(m, self.s.maildirs.path_for(m), incoming)]
        except AddressError:
            return []  # not a mailbox path: _data_start answers that

    async def _sieve_reject(self, tx: Transaction) -> Reply | None:
        """RFC 5429 §2.1: the one local recipient's Sieve reject/ereject
        refuses the message here (delivery/sieve.py); with more recipients
        it is delivered and the script bounces it for its own."""
        check, env = self.s.sieve_ereject, tx.envelope
        if check is None or tx.local is None or len(env.mailboxes) != 1 or env.remote:
            return None
        if not tx.local.in_memory:
            return None  # large: judged after delivery (a bounce)
        reason = await check(tx.local)
        return None if reason is None else Reply(550, reason, "5.7.1")

    async def _over_quota(self, tx: Transaction) -> Reply | None:
        """After the data, if this message would take a mailbox past its quota
        (RFC 3463 X.2.2).  The reply covers the whole message, so:

        * its only destination: 552 5.2.2, the sender is told at once (as
          Dovecot's LMTP answers that recipient by default);
        * one of several: 452 4.2.2, and the tracker remembers the size, so
          the client's retry is refused for that mailbox alone at RCPT and
          everyone else's copy goes through (never a 5xx for them)."""
        quota = self.s.quota
        if quota is None or tx.local is None:
            return None
        size = tx.local.size  # the file each mailbox gets, trace headers included
        env = tx.envelope
        lacking = [
            (mailbox, path)
            for mailbox in env.mailboxes
            if not await quota.room(mailbox, path := self.s.maildirs.path_for(mailbox), size)
        ]
        if not lacking:
            return None
        if len(env.mailboxes) == 1 and not env.remote:
            return Reply(552, "Mailbox full: the message exceeds the recipient's quota", "5.2.2")
        for mailbox, path in lacking:
            quota.no_room(path, size)
            log.info(
                "smtp quota defer id=%s client=%s mailbox=%s size=%d",
                tx.queue_id,
                self.client_ip,
                logfmt.path(mailbox),
                size,
            )
        return Reply(452, "A recipient's mailbox is full; try again later", "4.2.2")

    async def _judge_inbound(self, tx: Transaction) -> Reply | None:
        """SPF/DKIM/DMARC (policy/mailauth.py): an Authentication-Results header
        to add, and possibly a refusal (DMARC reject) or a temporary failure."""
        checks = self.s.inbound_checks
        assert checks is not None  # messages are held for them only (_inbound_checks_apply)
        outcome = await checks.judge(
            client_ip=self.client_ip,
            helo=self.helo,
            sender=tx.envelope.sender,
            message=tx.gate.held(),
            queue_id=tx.queue_id,
        )
        tx.extra_headers = outcome.header
        if outcome.quarantine and outcome.reply is None and tx.spool is not None:
            # Filtered: the Junk folder is chosen once the filters have spoken.
            tx.quarantine_reason = outcome.quarantine
            tx.extra_headers += (
                f"X-Postoffice-Quarantine: {outcome.quarantine} (RFC 7489 6.3)\n".encode()
            )
        elif outcome.quarantine and outcome.reply is None and tx.local is not None:
            await self._quarantine(tx, outcome.quarantine)
        return outcome.reply

    async def _quarantine(self, tx: Transaction, reason: str) -> None:
        """RFC 7489 §6.3 p=quarantine: the local copies go to each mailbox's
        Junk folder (storage/folders.py), with a header saying why; nothing is
        written yet (the message was held for the checks)."""
        assert tx.local is not None and not tx.local_prefix_done
        maildirs = self.s.maildirs
        paths = [maildirs.path_for(m) for m in tx.envelope.mailboxes]
        loop = asyncio.get_running_loop()
        try:
            junk = [await loop.run_in_executor(None, junk_folder_blocking, p) for p in paths]
        except OSError as exc:  # no Junk folder: the inbox, still marked
            log.error("id=%s: no Junk folder, quarantined to INBOX: %s", tx.queue_id, exc)
            folder = "INBOX"
        else:
            await tx.local.discard()
            # The users' Sieve scripts still run; their keep leaves it in Junk.
            mailboxes = list(tx.envelope.mailboxes)
            facts = delivery_facts(mailboxes, tx.envelope.originals, "Junk")
            tx.local = maildirs.writer_to(junk, folders=True, facts=facts)
            folder = "Junk"
        tx.extra_headers += f"X-Postoffice-Quarantine: {reason} (RFC 7489 6.3)\n".encode()
        maillog.quarantined(tx.queue_id, reason=reason, folder=folder)

    def _content_verdict(self, event: DataComplete, tx: Transaction) -> Reply | None:
        limit = self.s.settings.limits.max_message_size
        if event.oversize:
            return Reply(552, f"Message size exceeds fixed limit of {limit} octets", "5.3.4")
        if event.bare_cr:
            return Reply(
                554, "Bare CR in message content is not allowed (RFC 5321 section 2.3.8)", "5.6.0"
            )
        if event.line_too_long:
            # Lines over 998 octets are kept (and folded when relayed); past
            # this bound the message is refused (the decoder streamed it).
            longest = self.s.settings.limits.max_line_length
            return Reply(554, f"Message has a line longer than {longest} octets", "5.6.0")
        headers = tx.gate.headers()
        if tx.gate.header_overflow or len(headers) >= MAX_HEADER_BLOCK:
            # Nothing after the first MAX_HEADER_BLOCK octets is parsed, so a
            # From: hidden there could not be checked: refuse, as Postfix's
            # header_size_limit does.
            return Reply(552, "Message header section too large", "5.3.4")
        if count_fields(headers, "received") >= MAX_HOPS:
            return Reply(554, "Too many hops: mail loop detected (RFC 5321 section 6.3)", "5.4.6")
        if self.mode is SmtpMode.SUBMISSION and self.user is not None:
            for author in tx.gate.from_addresses():
                if not sender_allowed(self.s.accounts, self.user, author):
                    return Reply(
                        553, f"From: address {author} not owned by user {self.user}", "5.7.1"
                    )
        return None

    async def _commit(self, tx: Transaction, size: int) -> Reply:
        try:
            if tx.outbound is not None:
                # The queue keeps the session's id: one id in the reply, the
                # Received: header and every mail log record (maillog.py).
                await tx.outbound.commit()
                tx.outbound = None
            if tx.local is not None:
                if not tx.local_prefix_done:
                    tx.local_prefix_done = True
                    await tx.local.write(self._local_prefix(tx))
                files = await tx.local.commit()
                tx.local = None
                for mailbox, file in zip(tx.envelope.mailboxes, files, strict=False):
                    maillog.stored(tx.queue_id, mailbox=mailbox, file=str(file))
        except Exception as exc:
            await self._discard(tx)
            fault = fault_of(exc)
            if fault is None:  # not storage failing: a bug, with its traceback
                log.exception("smtp delivery failed id=%s", tx.queue_id)
            else:
                log.error("smtp delivery failed id=%s: %s", tx.queue_id, exc)
            return _storage_reply(fault)
        return Reply(250, f"Ok: queued as {tx.queue_id}", "2.0.0")

    async def _abandon(self) -> None:
        tx, self.tx = self.tx, None
        if tx is not None:
            await self._discard(tx)

    async def _discard(self, tx: Transaction) -> None:
        if tx.spool is not None:
            spool, tx.spool = tx.spool, None
            await spool.discard()
        if tx.held_bytes:
            self._release_held(tx)
        if tx.local is not None:
            await tx.local.discard()
        if tx.outbound is not None:
            await tx.outbound.discard()

    def _log_transaction(self, tx: Transaction, size: int, reply: Reply) -> None:
        env = tx.envelope
        maillog.received(
            tx.queue_id,
            mode=self.mode_name,
            client=self.client_ip,
            helo=self.helo,
            tls=self._tls_field(),
            user=self.user,
            sender=env.sender,
            recipients=env.recipients,
            size=size,
            code=reply.code,
            status=reply.enhanced or "",
            seconds=time.monotonic() - tx.started,
        )

    # --- AUTH (RFC 4954) --------------------------------------------------------
    async def _auth(self, event: Auth) -> Reply:
        if self.mode is not SmtpMode.SUBMISSION:
            return Reply(502, "AUTH not available on this port", "5.5.1")
        if not self._auth_allowed():
            return Reply(
                538, "Encryption required for requested authentication mechanism", "5.7.11"
            )
        self._sasl = sasl.SaslExchange.start(event.mechanism)
        if self._sasl is None:
            return Reply(504, "Unrecognized authentication type", "5.5.4")
        return await self._sasl_reply(self._sasl.initial(event.initial_response))

    async def _auth_step(self, line: str) -> Reply:
        if self._sasl is None:  # the core sends a response only after our 334
            raise RuntimeError("a SASL response without an exchange")
        return await self._sasl_reply(self._sasl.respond(line))

    async def _sasl_reply(self, outcome: sasl.Outcome) -> Reply:
        """The exchange's next step in SMTP's words (RFC 4954 §4, §6)."""
        if isinstance(outcome, sasl.Challenge):
            return Reply(334, outcome.base64)
        self._sasl = None
        if isinstance(outcome, sasl.Done):
            return await self._check_password(outcome.authcid, outcome.password)
        if outcome.kind is sasl.FailKind.CANCELLED:
            return Reply(501, "Authentication cancelled", "5.0.0")
        if outcome.kind is sasl.FailKind.NOT_PERMITTED:
            return Reply(535, "Authentication credentials invalid", "5.7.8")
        return Reply(501, "Cannot decode response", "5.5.2")

    async def _check_password(self, name: str, password: str) -> Reply:
        try:
            user = await self.s.authenticator.login(name, password, self.client_ip, "smtp")
        except LoginThrottled:
            # RFC 4954 §6: a temporary failure; the password was not judged.
            return Reply(454, "Temporary authentication failure, try again later", "4.7.0")
        if user is None:
            return Reply(535, "Authentication credentials invalid", "5.7.8")
        self.user = user
        return Reply(235, "Authentication successful", "2.7.0")


def _verb(event: Event) -> str:
    """The command an event is, for the tally ("" for what is none: data,
    a SASL response line)."""
    match event:
        case Hello(extended=extended):
            return "ehlo" if extended else "helo"
        case Rejected(command=command):
            return command or "unknown"
        case DataChunk() | DataComplete() | AuthResponse() | ChunkStart():
            return ""
        case ChunkComplete():
            return "bdat"
    return _VERBS.get(type(event), "")


_VERBS: dict[type, str] = {
    MailFrom: "mail",
    RcptTo: "rcpt",
    DataRequested: "data",
    Reset: "rset",
    Noop: "noop",
    Quit: "quit",
    Verify: "vrfy",
    Help: "help",
    StartTls: "starttls",
    Auth: "auth",
}


def _storage_reply(fault: StorageFault | None) -> Reply:
    """The one answer to storage failing (storage/errors.py): RFC 3463
    X.3.1 "mail system full" when there is no room, else a local error."""
    return _NO_SPACE if fault is StorageFault.NO_SPACE else _LOCAL_ERROR
