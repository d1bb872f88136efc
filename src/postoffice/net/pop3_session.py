"""The POP3 session: drives the sans-I/O core over a Connection and decides.

The core (``protocol/pop3.py``) parses and keeps the state; this module
answers: who may log in and when (plaintext policy, ``policy/auth.py``),
which maildrop (``storage/pop3_mailbox.py``, locked for the session), and
streams messages.  Replies to pipelined commands (RFC 2449 §6.6) are
collected and written together before the session waits for more input.

What never happens outside UPDATE (RFC 1939 §6): no message is removed when
the client drops, times out, or the server stops; only QUIT in TRANSACTION
deletes.  The idle timer (RFC 1939 §3, at least 10 minutes) closes without a
reply, as §3 asks.

Speed: the one trick, and why it stays.  A client fetching a mailbox sends
RETR 1, RETR 2, ... and waits for each.  Small messages are read ahead
(``storage.pop3_mailbox.ReadAhead``: one executor hop per window, not per
message), and ``answer_at_once``, the connection's ``on_data``, answers a
lone RETR line for a message read ahead right in the receive callback,
without waking the session task.  The core parses that line
(``Pop3Server.take_line``), so the answer is the one the ordinary way would
give; anything else takes the ordinary way untouched.  What the callback
buys (``bench/run.py --only pop3 --runs 5``, this code against itself with
``on_data`` unset, medians of pairwise ratios [min-max], 2-core VM at load
0.8): pop3-10k-plain 1.06x msg/s [1.03-1.09] with 0.91x server CPU,
pop3-10k-pop3s 1.12x [1.05-1.13] with 0.87x CPU; 1 MiB messages, which are
streamed, not read ahead, are unchanged.  Without it every RETR costs a
task wake-up, which at 10 KiB is a tenth of the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from postoffice import logfmt, maillog, metrics
from postoffice.mail.address import Address, AddressError
from postoffice.net.connection import Connection, ConnectionClosed, ShuttingDown
from postoffice.policy.auth import LoginThrottled
from postoffice.policy.clients import may_send_password
from postoffice.protocol import sasl
from postoffice.protocol.pop3 import (
    NEED_DATA,
    Auth,
    AuthResponse,
    BadCommand,
    Capa,
    Dele,
    Event,
    List,
    MessageEncoder,
    Noop,
    Pass,
    Pop3Server,
    Pop3State,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    capabilities,
    retr_wire_form,
    wire_size,
)
from postoffice.services import Services
from postoffice.storage import quota
from postoffice.storage.errors import StorageFault, fault_of
from postoffice.storage.maildir import mailbox_path
from postoffice.storage.pop3_mailbox import (
    MailboxBusy,
    MessageGone,
    Pop3Mailbox,
    Pop3Message,
    ReadAhead,
    UpdateResult,
)

log = logging.getLogger("postoffice.pop3")

T = TypeVar("T")

TLS_HANDSHAKE_TIMEOUT = 30.0
MAX_AUTH_FAILURES = 3  # per connection; the throttle slows retries across connections
FLUSH_AT = 256 * 1024  # write collected replies once this much is pending
IMPLEMENTATION = "postoffice"
GONE = "Message was removed by another client"
PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure connections; use STLS"


class _Abort(Exception):
    """End the session now (the reply, if any, is already queued)."""


class Pop3Session:
    def __init__(self, services: Services, conn: Connection) -> None:
        self.s = services
        self.conn = conn
        self.core = Pop3Server()
        self.client_ip = conn.peer[0]
        self.timeout = services.settings.limits.pop3_timeout
        conn.write_timeout = self.timeout
        self._line_deadline: float | None = None
        self.mailbox: Pop3Mailbox | None = None
        self.user: Address | None = None
        self.errors = 0
        self.auth_failures = 0
        self.retrieved = 0
        self.outcome = "dropped"
        # Replies not yet written: the pieces (a read-ahead message is not
        # copied until the one join that writes it) and their total length.
        self._out: list[bytes] = []
        self._out_size = 0
        self._sasl: sasl.SaslExchange | None = None  # an AUTH exchange under way
        self._update: UpdateResult | None = None
        self.ahead: ReadAhead | None = None  # RETR's reader, with the mailbox
        self._at_once: tuple[int, Pop3Message, bytes] | None = None  # see answer_at_once
        # Blocking work still running for this mailbox: the lock is released
        # only after it finishes, even if the session is cancelled meanwhile.
        self._io: asyncio.Future[Any] | None = None
        conn.on_data = self.answer_at_once

    # --- the loop -------------------------------------------------------------
    async def run(self) -> None:
        started_tls = self.conn.tls
        metrics.session("pop3")
        try:
            self._send(self.core.greeting(f"{self.s.settings.hostname} POP3 server ready"))
            await self._serve()
        except (ConnectionClosed, ConnectionError, _Abort):
            pass
        except ShuttingDown:
            self.outcome = "shutdown"
            self._send(b"-ERR [SYS/TEMP] server shutting down\r\n")
            await self._flush()
        except TimeoutError:
            self.outcome = "timeout"  # RFC 1939 §3: close without a reply or UPDATE
        finally:
            await self._finish(started_tls)

    def _until_line_deadline(self) -> float:
        """Seconds left for the line being read.  The idle timer restarts
        with each command (RFC 1939 §3), not with each byte, so a client that
        dribbles a byte at a time (slowloris) is cut off like a silent one."""
        now = self.conn.time()
        if self._line_deadline is None:
            self._line_deadline = now + self.timeout
        return max(0.0, self._line_deadline - now)

    async def _serve(self) -> None:
        core = self.core
        while core.state is not Pop3State.CLOSED:
            event = core.next_event()
            if event is NEED_DATA:
                await self._flush()
                # Waiting for a command is a safe point to stop at: without QUIT
                # there is no UPDATE, so a shutdown deletes nothing (RFC 1939 §6).
                received = await self.conn.read(self._until_line_deadline(), interruptible=True)
                if b"\n" in received:
                    self._line_deadline = None
                core.receive_data(received)
                continue
            metrics.pop3_command(type(event).__name__)
            # The hot path, RETR of a message read ahead, answers without an await.
            if type(event) is Retr and self._retr_ahead(event.msg):
                if self._out_size >= FLUSH_AT:
                    await self._flush()
                continue
            match event:
                case BadCommand(reason):
                    self._error(reason)
                case Capa():
                    self._capa()
                case Stls():
                    await self._stls()
                case User():
                    self._user_command()
                case Pass(user, password):
                    await self._login(user, password)
                case Auth(mechanism, initial):
                    await self._auth(mechanism, initial)
                case AuthResponse(line):
                    await self._auth_step(line)
                case Quit():
                    await self._quit()
                case _:
                    await self._transaction(event)
            if self._out_size >= FLUSH_AT:
                await self._flush()
        await self._flush()

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    async def _flush(self) -> None:
        out = self._out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            self._out = []
            self._out_size = 0
        transport = self.conn.transport
        if transport is None or transport.get_write_buffer_size() == 0:
            return  # the kernel took everything: nothing to wait for
        # A client that stops reading must not hold the session (and the lock)
        # forever: drain gives up after conn.write_timeout (set in __init__).
        await self.conn.drain()

    def _error(self, reason: str) -> None:
        self.errors += 1
        if self.errors >= self.s.settings.limits.max_errors:
            self._send(self.core.reply_err(f"{reason}; too many errors, closing"))
            self.core.close()
            self.outcome = "too many errors"
        else:
            self._send(self.core.reply_err(reason))

    def _busy(self) -> list[asyncio.Future[Any]]:
        """Blocking work for this mailbox still running in the pool."""
        busy = [] if self.ahead is None else self.ahead.pending()
        return busy if self._io is None or self._io.done() else [self._io, *busy]

    async def _blocking(self, func: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.s.executor, func, *args)
        self._io = future
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._io = None

    # --- AUTHORIZATION --------------------------------------------------------
    def _plaintext_ok(self) -> bool:
        return may_send_password(
            self.conn.tls, self.client_ip, self.s.settings.auth.allow_plaintext_loopback
        )

    def _capa(self) -> None:
        caps = capabilities(
            self.core.state,
            stls=not self.conn.tls,
            sasl=sasl.MECHANISMS if self._plaintext_ok() else (),
            implementation=IMPLEMENTATION,
        )
        self._send(self.core.multiline("Capability list follows", caps))

    async def _stls(self) -> None:
        if self.conn.tls:
            self._send(self.core.reply_err("Already using TLS"))
            return
        if self.core.has_buffered_data:
            # RFC 2595 §4: commands pipelined behind STLS would run as if they
            # had come over TLS (the STARTTLS injection attack); refuse and close.
            self._send(self.core.reply_err("Nothing may follow STLS before the handshake"))
            self.core.close()
            self.outcome = "data after STLS"
            return
        self._send(self.core.reply_ok("Begin TLS negotiation"))
        await self._flush()
        try:
            await self.conn.start_tls(self.s.tls, TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("pop3 client=%s STLS handshake failed: %s", self.client_ip, exc)
            self.outcome = "TLS handshake failed"
            raise _Abort from None
        self.core.tls_established()

    def _user_command(self) -> None:
        if not self._plaintext_ok():
            self._send(self.core.reply_err(PLAINTEXT_REFUSED, "AUTH"))
            return
        # The same +OK for every name: USER must not reveal which accounts exist.
        self._send(self.core.reply_ok("Send your password"))

    async def _auth(self, mechanism: str | None, initial: str | None) -> None:
        if not self._plaintext_ok():
            self._send(self.core.reply_err(PLAINTEXT_REFUSED, "AUTH"))
            return
        if mechanism is None:
            self._send(self.core.multiline("Mechanisms follow", sasl.MECHANISMS))
            return
        self._sasl = sasl.SaslExchange.start(mechanism)
        if self._sasl is None:
            self._send(self.core.reply_err("Unsupported authentication mechanism"))
            return
        await self._sasl_reply(self._sasl.initial(initial))

    async def _auth_step(self, line: str) -> None:
        if self._sasl is None:  # the core reads a response only after our continuation
            raise RuntimeError("a SASL response without an exchange")
        await self._sasl_reply(self._sasl.respond(line))

    async def _sasl_reply(self, outcome: sasl.Outcome) -> None:
        """The exchange's next step in POP3's words (RFC 5034 §4)."""
        if isinstance(outcome, sasl.Challenge):
            self._send(self.core.continuation(outcome.base64))
            return
        self._sasl = None
        if isinstance(outcome, sasl.Done):
            await self._login(outcome.authcid, outcome.password)
        elif outcome.kind is sasl.FailKind.CANCELLED:
            self._send(self.core.reply_err(outcome.reason))  # not an error: the client chose
        else:
            self._error(outcome.reason)

    async def _login(self, name: str, password: str) -> None:
        text, code = "Authentication failed", "AUTH"
        try:
            user = await self.s.authenticator.login(name, password, self.client_ip, "pop3")
        except LoginThrottled:
            # RFC 3206 §4: SYS/TEMP, not AUTH: the password was not judged, so
            # a client must not ask its user for a new one; it may try later.
            user, text, code = None, "Too many failed logins, try again later", "SYS/TEMP"
        if user is None:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self._send(self.core.reply_err(f"{text}; closing", code))
                self.core.close()
                self.outcome = "auth failures"
            else:
                self._send(self.core.reply_err(text, code))
            return
        try:
            path = mailbox_path(self.s.settings.mail_dir, user)
            locks = self.s.pop3_locks
            shared = functools.partial(locks.acquire, str(user)) if locks is not None else None
            self.mailbox = await self._blocking(Pop3Mailbox.open, path, wire_size, shared)
            self.ahead = ReadAhead(self.mailbox, self.s.executor, retr_wire_form)
        except MailboxBusy:
            # RFC 2449 §8.1.1: another session has the maildrop; try later.
            log.info("pop3 client=%s user=%s mailbox in use", self.client_ip, logfmt.field(user))
            self._send(self.core.reply_err("Mailbox is in use by another session", "IN-USE"))
            return
        except (OSError, AddressError) as exc:
            log.error("pop3 user=%s cannot open mailbox: %s", logfmt.field(user), exc)
            # RFC 3206 §4: SYS/PERM when retrying cannot help until an
            # administrator acts (the Maildir is not a directory, or is not
            # ours to open); SYS/TEMP for the passing kind (I/O, no descriptors).
            if isinstance(exc, AddressError) or fault_of(exc) is StorageFault.NEEDS_ADMIN:
                self._send(self.core.reply_err("The mailbox cannot be opened", "SYS/PERM"))
            else:
                self._send(self.core.reply_err("Cannot open the mailbox now", "SYS/TEMP"))
            return
        self.user = user
        count, size = self.mailbox.stat()
        note = await self._quota_note(user, path)
        self._send(self.core.reply_ok(f"Logged in, {count} messages ({size} octets){note}"))

    async def _quota_note(self, user: Address, path: Path) -> str:
        """The mailbox's quota usage for the login +OK, if it has a quota.
        POP3 has no quota command, and clients show no STAT text (whose
        form RFC 1939 §5 fixes and clients parse); the +OK of a login is
        free text that fetchmail, mpop and others log."""
        tracker = self.s.quota
        limit = tracker.limit(user) if tracker is not None else 0
        if limit <= 0:
            return ""
        try:
            usage = await self._blocking(quota.usage_blocking, path, limit)
        except OSError as exc:
            log.error("pop3 user=%s cannot count the mailbox: %s", logfmt.field(user), exc)
            return ""
        percent = min(100, usage.bytes * 100 // limit)
        note = f"; quota {usage.bytes} of {limit} octets used ({percent}%)"
        if usage.bytes >= limit:
            note += ", mailbox full: delete messages to receive new mail"
        return note

    # --- TRANSACTION ----------------------------------------------------------
    async def _transaction(self, event: object) -> None:
        box = self.mailbox
        assert box is not None, "TRANSACTION without a mailbox"
        core = self.core
        match event:
            case Stat():
                count, size = box.stat()
                self._send(core.reply_ok(f"{count} {size}"))
            case List(None):
                count, size = box.stat()
                lines = (f"{n} {m.size}" for n, m in box.live())
                self._send(core.multiline(f"{count} messages ({size} octets)", lines))
            case Uidl(None):
                lines = (f"{n} {m.uid}" for n, m in box.live())
                self._send(core.multiline("Unique-ID listing follows", lines))
            case List(int(n)) | Uidl(int(n)):
                msg = box.get(n)
                if msg is None:
                    self._send(core.reply_err(self._missing(n)))
                else:
                    value = msg.size if isinstance(event, List) else msg.uid
                    self._send(core.reply_ok(f"{n} {value}"))
            case Retr(n) | Top(n):
                msg = box.get(n)
                if msg is None:
                    self._send(core.reply_err(self._missing(n)))
                else:
                    top = event.lines if isinstance(event, Top) else None
                    started = metrics.clock()
                    await self._retrieve(box, n, msg, top)
                    if top is None:
                        metrics.fetched("pop3", metrics.clock() - started)
            case Dele(n):
                msg = box.get(n)
                if msg is None:
                    self._send(core.reply_err(self._missing(n)))
                elif msg.gone:
                    # RETR/TOP found it removed (another reader, `user remove`):
                    # deleting it now would be a claim UPDATE cannot keep.
                    self._send(core.reply_err(GONE))
                else:
                    msg.deleted = True  # RFC 1939 §6: removed only in UPDATE
                    self._send(core.reply_ok(f"Message {n} deleted"))
            case Noop():
                self._send(core.reply_ok())
            case Rset():
                box.reset()
                count, size = box.stat()
                self._send(core.reply_ok(f"Maildrop has {count} messages ({size} octets)"))

    def _missing(self, n: int) -> str:
        box = self.mailbox
        if box is not None and 1 <= n <= len(box.messages):
            return f"Message {n} already deleted"
        return "No such message"

    # --- RETR of a message read ahead: answered without an await ----------------
    def answer_at_once(self, data: bytes) -> bool:
        """The connection's fast path (``Connection.on_data``): input that
        arrived while the session task waits for a command.  A lone command
        line that the core parses as RETR of a message read ahead is
        answered here, in the receive callback, without waking the task;
        anything else returns False and takes the ordinary way, untouched."""
        started = metrics.clock()
        transport = self.conn.transport
        if (
            self._out  # replies not yet written go first
            # Back-pressure: with anything still unsent the task writes and
            # drains (with its timeout); nothing piles up here.
            or transport is None
            or transport.get_write_buffer_size()
            or self.core.take_line(data, self._can_answer_at_once) is None
        ):
            return False
        ready, self._at_once = self._at_once, None
        assert ready is not None
        n, msg, wire = ready
        self._send_message(msg, wire)
        # The idle timer restarts with each command (RFC 1939 §3): the next
        # line has the whole timeout from now, as after an ordinary command.
        self._line_deadline = self.conn.time() + self.timeout
        self.conn.move_read_deadline(self._line_deadline)
        out, self._out, self._out_size = self._out, [], 0
        self.conn.write(b"".join(out))
        metrics.pop3_command("Retr")
        metrics.fetched("pop3", metrics.clock() - started)
        # Handing the next window to a thread costs more than the rest of
        # this RETR together: done after the reply is on its way.
        self._refill(n)
        return True

    def _can_answer_at_once(self, event: Event) -> bool:
        """``take_line``'s question: is ``event`` a RETR of a message read ahead?"""
        self._at_once = None
        if type(event) is Retr and (ready := self._ready(event.msg)) is not None:
            self._at_once = (event.msg, *ready)
        return self._at_once is not None

    def _retr_ahead(self, n: int) -> bool:
        """Answer RETR ``n`` now if the message was read ahead and is here;
        False (nothing answered) sends it the ordinary way."""
        started = metrics.clock()
        ready = self._ready(n)
        if ready is None:
            return False
        self._send_message(*ready)
        self._refill(n)
        metrics.fetched("pop3", metrics.clock() - started)
        return True

    def _ready(self, n: int) -> tuple[Pop3Message, bytes] | None:
        """Message ``n`` and what RETR sends after its +OK line, if the
        message was read ahead and is here now.  One whose wire size is not
        its LIST size (a file changed since the snapshot) is None: RETR
        reads it again, streaming."""
        box, ahead = self.mailbox, self.ahead
        if box is None or ahead is None or (msg := box.get(n)) is None:
            return None
        wire = ahead.take(n)
        return None if wire is None else (msg, wire)

    def _send_message(self, msg: Pop3Message, wire: bytes) -> None:
        self._send(self.core.reply_ok(f"{msg.size} octets"))
        self._send(wire)
        msg.retrieved = True
        self.retrieved += 1

    def _refill(self, n: int) -> None:
        if self.ahead is not None:
            self.ahead.refill(n)

    async def _retrieve(
        self, box: Pop3Mailbox, n: int, msg: Pop3Message, lines: int | None
    ) -> None:
        """RETR (``lines`` None) or TOP: stream the file, converted as it is
        read; RETR of a small message reads the ones after it ahead."""
        ahead = self.ahead
        if lines is None and ahead is not None:
            wire = await ahead.wait(n)  # in the window being read, if it is there
            if wire is not None:
                self._send_message(msg, wire)
                ahead.refill(n)
                return
        try:
            if lines is None and ahead is not None:
                first, fh = await ahead.first(n, msg)
            else:  # TOP: rare, never read ahead
                first, fh = await self._blocking(box.read_first, msg)
        except MessageGone:
            msg.gone = True
            self._send(self.core.reply_err(GONE))
            return
        except OSError as exc:
            log.error(
                "pop3 user=%s cannot read %s: %s",
                logfmt.field(self.user),
                logfmt.field(msg.name),
                exc,
            )
            self._send(self.core.reply_err("Cannot read the message now", "SYS/TEMP"))
            return
        encoder = MessageEncoder(lines)
        head = f"{msg.size} octets" if lines is None else "Top of message follows"
        self._send(self.core.reply_ok(head))
        self._send(encoder.feed(first))
        try:
            while fh is not None and not encoder.done:
                await self._flush()
                chunk = await self._blocking(box.read_next, fh)
                if not chunk:
                    fh = None
                    break
                self._send(encoder.feed(chunk))
        except OSError as exc:
            # The +OK is out: there is no way to report this but to drop the line.
            log.error(
                "pop3 user=%s read of %s failed mid-message: %s",
                logfmt.field(self.user),
                logfmt.field(msg.name),
                exc,
            )
            self.outcome = "read error"
            self.conn.abort()
            raise _Abort from None
        finally:
            if fh is not None:
                _close_quietly(fh)
        self._send(encoder.finish())
        if lines is None:
            msg.retrieved = True
            self.retrieved += 1

    async def _quit(self) -> None:
        box = self.mailbox
        if box is None or self.core.state is not Pop3State.TRANSACTION:
            self.outcome = "quit"
            self._send(self.core.reply_ok("Logging out"))
            return
        if self.ahead is not None:
            await self.ahead.settle()  # no read of a file that UPDATE is changing
        try:
            result = await self._blocking(box.update)
        except OSError as exc:
            log.error("pop3 user=%s UPDATE failed: %s", logfmt.field(self.user), exc)
            self._send(self.core.reply_err("Could not update the maildrop", "SYS/TEMP"))
            return
        self._update = result
        self.outcome = "quit"
        box.close()
        if result.failed:
            # RFC 1939 §6: -ERR when some deletions could not be done.
            text = f"{result.failed} messages could not be deleted"
            self._send(self.core.reply_err(text, "SYS/TEMP"))
        else:
            self._send(self.core.reply_ok(f"Logging out, {result.deleted} messages deleted"))

    # --- the end --------------------------------------------------------------
    async def _finish(self, started_tls: bool) -> None:
        self.conn.on_data = None
        self.core.close()
        seen = 0
        if self._busy():
            # Cancelled while blocking work runs (opening, UPDATE, a read-ahead):
            # let it end, then unlock; a lock must never outlive its session.
            _release_after(self._busy(), self.mailbox)
        elif self.mailbox is not None and self.mailbox.locked:
            box = self.mailbox
            try:
                # Not a QUIT: nothing is deleted, but what was read is seen.
                if any(m.retrieved for m in box.messages):
                    seen = await self._blocking(box.mark_seen)
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                if self._busy():
                    _release_after(self._busy(), box)
                else:
                    box.close()
        result = self._update
        self._log_mail(result)
        log.info(
            "pop3 session client=%s user=%s tls=%s retrieved=%d deleted=%d seen=%d end=%s",
            self.client_ip,
            logfmt.field(self.user or "-"),
            "implicit" if started_tls else ("stls" if self.conn.tls else "no"),
            self.retrieved,
            result.deleted if result else 0,
            (result.seen if result else seen),
            logfmt.field(self.outcome),  # "TLS handshake failed": one quoted field
        )

    def _log_mail(self, result: UpdateResult | None) -> None:
        """One mail log record per message read, and per message deleted (at
        UPDATE, RFC 1939 §6); logged here, off RETR's fast path."""
        box = self.mailbox
        if box is None or self.user is None:
            return
        user, client = self.user, self.client_ip
        read = [m.name for m in box.messages if m.retrieved]
        maillog.retrieved("pop3", user=user, client=client, files=read)
        if result is not None and result.deleted:
            gone = [m.name for m in box.messages if m.deleted and not m.gone]
            maillog.deleted("pop3", user=user, client=client, files=gone)


def _release_after(futures: list[asyncio.Future[Any]], box: Pop3Mailbox | None) -> None:
    """Unlock ``box`` once every one of ``futures`` (blocking work) has finished."""
    remaining = len(futures)

    def done(future: asyncio.Future[Any]) -> None:
        nonlocal remaining
        if not future.cancelled() and future.exception() is None:
            result = future.result()
            if isinstance(result, Pop3Mailbox):  # opened for a session that is gone
                result.close()
        remaining -= 1
        if remaining == 0 and box is not None:
            box.close()

    for future in futures:
        future.add_done_callback(done)


def _close_quietly(fh: BinaryIO) -> None:
    with contextlib.suppress(OSError):
        fh.close()
