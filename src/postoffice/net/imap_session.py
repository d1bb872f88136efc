"""The IMAP session: drives the sans-I/O core over a Connection and decides.

The core (``protocol/imap.py``) frames and parses commands and keeps the
state; this module answers them: who may log in and when (LOGINDISABLED
before TLS, RFC 9051 §6.2.3, unless ``[auth] allow_plaintext_loopback``;
``policy/auth.py`` checks and throttles passwords), and what the mailbox
holds (``storage/imap_mailbox.py``: folders, files and the UID index,
every call run in the executor because it blocks).  Message data for FETCH
is in ``net/imap_fetch_items.py``.

What the session keeps of the selected folder is its *view*: the UIDs in
sequence-number order and their records, and the highest mod-sequence it
has reported.  Other sessions' changes (new mail, POP3 DELE, flags) are
compared against the view on NOOP, CHECK, during IDLE and after our own
changes, and sent as untagged EXISTS, EXPUNGE and FETCH (RFC 9051 §5.2,
§7.5); never during FETCH, STORE or SEARCH by sequence number, whose
numbers must not shift under the client (§7.5.1).

Timeouts: RFC 9051 §5.4's autologout (``[limits] imap_timeout``, 30
minutes) between commands; an IDLE lasts up to twice that (RFC 2177 §3
asks clients to renew it within 29 minutes).

IDLE notification: the selected folder is watched through the process's
one ``storage/folder_watch.FolderWatcher`` (inotify on its new/ and cur/,
shared with the other sessions of that folder); while idling the session
waits on the client and on that watch at once, and refreshes only when the
folder changed: a delivery by any process, a POP3 DELE, another session's
flag rename.  No timer, no stat while nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from postoffice import logfmt, metrics
from postoffice.mail.address import Address, AddressError
from postoffice.net.compress import InflateError
from postoffice.net.connection import Connection, ConnectionClosed, ShuttingDown, WriteTimeout
from postoffice.net.imap_commands import MailboxCommands, recent_since
from postoffice.net.imap_readahead import ReadAhead
from postoffice.policy.auth import LoginThrottled
from postoffice.policy.clients import may_send_password
from postoffice.protocol import imap_events as ev
from postoffice.protocol import sasl
from postoffice.protocol.imap import ImapServerCore, ImapState
from postoffice.protocol.imap_response import Atom, ResponseCode
from postoffice.services import Services
from postoffice.storage.folder_names import FolderName
from postoffice.storage.folder_watch import FolderWatch
from postoffice.storage.folders import FolderError
from postoffice.storage.imap_index import (
    FolderState,
    ImapIndexError,
    MessageRecord,
    RecentUids,
)
from postoffice.storage.imap_mailbox import ImapMailbox
from postoffice.storage.maildir import mailbox_path
from postoffice.storage.maildir_flags import KeywordsFull, MessageGone

log = logging.getLogger("postoffice.imap")

T = TypeVar("T")

TLS_HANDSHAKE_TIMEOUT = 30.0
MAX_AUTH_FAILURES = 3  # per connection; the throttle slows retries across connections
FLUSH_AT = 256 * 1024
IMPLEMENTATION = "postoffice"
ENABLEABLE = frozenset({"IMAP4REV2", "CONDSTORE", "QRESYNC"})


class _Abort(Exception):
    """End the session now (what was to be said is queued)."""


class ImapSession(MailboxCommands):
    def __init__(self, services: Services, conn: Connection) -> None:
        self.s = services
        self.conn = conn
        self.core = ImapServerCore(
            tls=conn.tls, max_append=services.settings.limits.max_message_size
        )
        self.client_ip = conn.peer[0]
        self.timeout = services.settings.limits.imap_timeout
        conn.write_timeout = self.timeout
        self.user: Address | None = None
        self.mailbox: ImapMailbox | None = None
        self.auth_failures = 0
        self.outcome = "dropped"
        self._out: list[bytes] = []
        self._out_size = 0
        self._sasl: sasl.SaslExchange | None = None
        # The selected folder's view (see the module docstring).
        self.selected: FolderName | None = None
        self.readonly = False
        self.uids: list[int] = []
        self.records: dict[int, MessageRecord] = {}
        self.modseq = 0
        self.unloaded: FolderState | None = None
        self.ghosts: set[int] = set()
        self.recent = RecentUids()  # rev1 only: this session's \Recent messages
        self.read_ahead = ReadAhead()  # whole messages a one-by-one FETCHer asks next
        self._watch: FolderWatch | None = None  # the selected folder's, for IDLE
        self._watch_path: Path | None = None

    # --- the loop -------------------------------------------------------------
    async def run(self) -> None:
        started_tls = self.conn.tls
        metrics.session("imap")
        try:
            code = ResponseCode("CAPABILITY", tuple(Atom(c) for c in self._capabilities()))
            self._send(self.core.greeting(f"{self.s.settings.hostname} IMAP server ready", code))
            await self._serve()
        except InflateError as exc:
            self.outcome = str(exc)  # logged by _finish; nothing can be read any more
        except (ConnectionClosed, ConnectionError, _Abort):
            pass
        except ShuttingDown:
            self.outcome = "shutdown"
            self._send(self.core.bye("Server shutting down"))
            await self._flush()
        except TimeoutError:
            self.outcome = "timeout"
            self._send(self.core.bye("Autologout; idle for too long"))
            self.conn.write(b"".join(self._out))
        finally:
            await self._finish(started_tls)

    async def _serve(self) -> None:
        core = self.core
        while core.state is not ImapState.LOGOUT:
            event = core.next_event()
            if event is None:
                await self._flush()
                core.receive_data(await self.conn.read(self.timeout, interruptible=True))
                continue
            await self._dispatch(event)
            if core.error_count >= self.s.settings.limits.max_errors:
                self._send(core.bye("Too many errors"))
                self.outcome = "too many errors"
            if self._out_size >= FLUSH_AT:
                await self._flush()
        await self._flush()

    async def _dispatch(self, event: ev.Event) -> None:
        core = self.core
        metrics.imap_command(event)
        match event:
            case ev.Rejected(fatal=fatal):
                self._send(core.reply_rejected())
                if fatal:
                    self.outcome = "input refused"
            case ev.LiteralExpected():
                self._send(core.continue_literal())
            case ev.Capability():
                self._send(core.untagged(Atom("CAPABILITY"), *map(Atom, self._capabilities())))
                self._ok("CAPABILITY completed")
            case ev.Noop() | ev.Check():
                await self._report_changes()
                self._ok("NOOP completed")
            case ev.Logout():
                self.outcome = "logout"
                self._send(core.bye("Logging out"))
                self._ok("LOGOUT completed")
            case ev.StartTls():
                await self._starttls()
            case ev.Login(user=user, password=password):
                if not self._plaintext_ok():
                    self._no("LOGIN is disabled before STARTTLS", "PRIVACYREQUIRED")
                else:
                    await self._login(user, password)
            case ev.Authenticate(mechanism=mechanism, initial=initial):
                await self._authenticate(mechanism, initial)
            case ev.AuthResponse(line=line):
                assert self._sasl is not None, "a SASL response without an exchange"
                await self._sasl_reply(self._sasl.respond(line))
            case ev.Id():
                self._send(core.untagged(Atom("ID"), ["name", IMPLEMENTATION]))
                self._ok("ID completed")
            case ev.Enable(capabilities=caps):
                enabled = [c for c in caps if c in ENABLEABLE and c not in core.enabled]
                for cap in enabled:
                    core.enable(cap)
                if "QRESYNC" in enabled:
                    self.condstore_on()  # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE
                if enabled:
                    names = ["IMAP4rev2" if c == "IMAP4REV2" else c for c in enabled]
                    self._send(core.untagged(Atom("ENABLED"), *map(Atom, names)))
                else:
                    self._send(core.untagged(Atom("ENABLED")))
                self._ok("ENABLE completed")
            case ev.Namespace():
                self._send(core.untagged(Atom("NAMESPACE"), [["", "."]], None, None))
                self._ok("NAMESPACE completed")
            case ev.Idle():
                await self._idle()
            case ev.IdleDone():
                self._ok("IDLE terminated")
            case ev.Compress(mechanism=mechanism):
                await self._compress(mechanism)
            case ev.Fetch():
                started = metrics.clock()
                await self._mailbox_command(event)
                metrics.fetched("imap", metrics.clock() - started)
            case _:
                await self._mailbox_command(event)

    # --- output helpers ----------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _ok(self, text: str, code: ResponseCode | None = None) -> None:
        self._send(self.core.tagged("OK", text, code))

    def _no(self, text: str, code: str | ResponseCode | None = None) -> None:
        if isinstance(code, str):
            code = ResponseCode(code)
        self._send(self.core.tagged("NO", text, code))

    def _bad(self, text: str) -> None:
        self._send(self.core.tagged("BAD", text))

    async def _flush(self) -> None:
        out = self._out
        if out:
            self.conn.writelines(out)
            self._out = []
            self._out_size = 0
        transport = self.conn.transport
        if transport is None or transport.get_write_buffer_size() == 0:
            return
        await self.conn.drain()

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.s.executor, func, *args)

    # --- not authenticated ------------------------------------------------------------
    def _plaintext_ok(self) -> bool:
        return may_send_password(
            self.conn.tls, self.client_ip, self.s.settings.auth.allow_plaintext_loopback
        )

    def _capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "IMAP4rev2"]
        # By the user, not the core's state: the OK to LOGIN lists what
        # holds once it is read (RFC 9051 §6.2.3), the core moves as it is sent.
        if self.user is None:
            if not self.conn.tls:
                caps.append("STARTTLS")
            if self._plaintext_ok():
                caps += [f"AUTH={m}" for m in sasl.MECHANISMS]
            else:
                caps.append("LOGINDISABLED")
            caps.append("SASL-IR")
        caps += ["LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT", "UIDPLUS", "MOVE"]
        caps += ["CHILDREN", "SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "ESEARCH"]
        caps += ["CONDSTORE", "QRESYNC", "QUOTA", "QUOTA=RES-STORAGE"]
        caps.append(f"APPENDLIMIT={self.core.max_append}")
        if self.user is not None and self.conn.deflate is None:
            caps.append("COMPRESS=DEFLATE")  # after login, as Dovecot: COMPRESS needs it
        return caps

    async def _starttls(self) -> None:
        if self.conn.tls:
            self._bad("TLS is already active")
            return
        self._ok("Begin TLS negotiation now")
        await self._flush()
        try:
            await self.conn.start_tls(self.s.tls, TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("imap client=%s STARTTLS handshake failed: %s", self.client_ip, exc)
            self.outcome = "TLS handshake failed"
            raise _Abort from None
        self.core.tls_established()

    async def _compress(self, mechanism: str) -> None:
        """COMPRESS (RFC 4978 §3): the OK goes out plain, then both ways deflate."""
        if self.conn.deflate is not None:
            self._no("DEFLATE is already active", "COMPRESSIONACTIVE")  # RFC 4978 §3
            return
        if mechanism != "DEFLATE":
            self._bad("Unknown compression mechanism")  # §3: an invalid argument is BAD
            return
        self._ok("DEFLATE active")
        await self._flush()
        # What the client sent after the command is already compressed.
        self.conn.start_deflate(self.core.take_buffered())

    async def _authenticate(self, mechanism: str, initial: str | None) -> None:
        if not self._plaintext_ok():
            self._no("Authentication is disabled before STARTTLS", "PRIVACYREQUIRED")
            return
        self._sasl = sasl.SaslExchange.start(mechanism)
        if self._sasl is None:
            self._no("Unsupported authentication mechanism", "CANNOT")
            return
        await self._sasl_reply(self._sasl.initial(initial))

    async def _sasl_reply(self, outcome: sasl.Outcome) -> None:
        """The exchange's next step in IMAP's words (RFC 9051 §6.2.2)."""
        if isinstance(outcome, sasl.Challenge):
            self._send(self.core.continuation(outcome.base64))
            return
        self._sasl = None
        if isinstance(outcome, sasl.Done):
            await self._login(outcome.authcid, outcome.password)
        elif outcome.kind is sasl.FailKind.CANCELLED:
            self._bad(outcome.reason)  # RFC 9051 §6.2.2: a cancelled exchange is BAD
        else:
            self._no(outcome.reason, "AUTHENTICATIONFAILED")

    async def _login(self, name: str, password: str) -> None:
        text, code = "Authentication failed", "AUTHENTICATIONFAILED"
        try:
            user = await self.s.authenticator.login(name, password, self.client_ip, "imap")
        except LoginThrottled:
            # RFC 5530 UNAVAILABLE: the password was not judged; try later.
            user, text, code = None, "Too many failed logins, try again later", "UNAVAILABLE"
        if user is None:
            self.auth_failures += 1
            self._no(text, code)
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self._send(self.core.bye("Too many failed logins"))
                self.outcome = "auth failures"
            return
        try:
            path = mailbox_path(self.s.settings.mail_dir, user)
            self.mailbox = await self._blocking(ImapMailbox.open, path, self.s.settings.hostname)
        except (OSError, AddressError, ImapIndexError) as exc:
            log.error("imap user=%s cannot open mailbox: %s", logfmt.field(user), exc)
            self._no("Cannot open the mailbox now", "UNAVAILABLE")
            return
        self.user = user
        code_caps = ResponseCode("CAPABILITY", tuple(Atom(c) for c in self._capabilities()))
        self._ok("Logged in", code_caps)

    # --- authenticated and selected -----------------------------------------------------
    async def _mailbox_command(self, event: ev.Event) -> None:
        box = self.mailbox
        assert box is not None, "a mailbox command before login"
        try:
            await self.mailbox_command(box, event)
        except FolderError as exc:
            self._no(str(exc), exc.code.value)
        except MessageGone:
            self._no("A message was removed meanwhile", "EXPUNGEISSUED")
        except KeywordsFull:
            self._no("No room for another keyword in this mailbox", "LIMIT")
        except (WriteTimeout, ConnectionError):
            # OSErrors too, but of the client (FETCH flushes as it goes), not
            # of storage: the session ends (run()), it does not answer NO
            # and serve the next pipelined FETCH into a dead connection.
            raise
        except (OSError, ImapIndexError) as exc:
            log.error("imap user=%s storage failed: %s", logfmt.field(self.user), exc)
            self._no("The mailbox cannot be used now", "UNAVAILABLE")

    # --- the selected folder's view ---------------------------------------------------
    async def _report_changes(self) -> None:
        """Tell the client what changed in its folder since it last heard."""
        box, name = self.mailbox, self.selected
        if box is None or name is None:
            return
        await self.load_view(box)
        refresh = await self._blocking(box.refresh, name, self.modseq)
        self.forget_all(refresh.vanished)
        added = False
        for record in refresh.changed:
            old = self.records.get(record.uid)
            if old is None:
                if self.uids and record.uid < self.uids[-1]:
                    continue  # an old UID we already dropped: cannot come back
                self.records[record.uid] = record
                self.uids.append(record.uid)
                added = True
            elif old.flags != record.flags:
                self.records[record.uid] = record
                values = self.flag_values(record)
                self._send(self.core.untagged(self.seq_of(record.uid), Atom("FETCH"), values))
        if added:
            self._send(self.core.untagged(len(self.uids), Atom("EXISTS")))
            if self.rev1:  # RFC 3501 §7.3.2: RECENT comes with the new EXISTS
                below = self.uids[-1] + 1
                first, _count = await self._blocking(
                    recent_since, box, name, below, not self.readonly
                )
                self.recent.add(first, below)
                self._send(self.core.untagged(self.recent_count(), Atom("RECENT")))
        self.modseq = max(self.modseq, refresh.state.highestmodseq)

    # --- IDLE (RFC 2177) ---------------------------------------------------------------
    def watch_selected(self, box: ImapMailbox, folder: FolderName) -> None:
        """SELECT/EXAMINE: remember ``folder`` for IDLE's wake-up.  The watch
        itself is taken at the first IDLE: adding an inotify watch costs
        milliseconds on a big folder (7 ms on 100,000 messages here), which
        a session that never idles should not pay at each SELECT."""
        self.unwatch()
        self._watch_path = box.folders.path(folder)

    def unwatch(self) -> None:
        watch, self._watch = self._watch, None
        self._watch_path = None
        if watch is not None:
            watch.close()

    async def _idle(self) -> None:
        self._send(self.core.continuation("idling"))
        # The "+" goes out alone, before any change is reported: clients such
        # as getmail read the continuation through a buffered reader and then
        # select() on the socket, so an EXISTS in the same read would sit in
        # their buffer unseen until the IDLE times out.
        await self._flush()
        if self._watch is None and self._watch_path is not None:
            # Taken before the look below: a change after it wakes us.
            self._watch = self.s.folder_watcher.watch(self._watch_path)
        watch = self._watch
        if watch is not None:
            watch.changed.clear()  # before the look: a change after it wakes us
        await self._report_changes()
        await self._flush()
        # The client is silent while idling: the read's timeout is the IDLE's
        # whole length (twice the autologout, RFC 2177 §3).
        read = asyncio.ensure_future(self.conn.read(2 * self.timeout, interruptible=True))
        try:
            while watch is not None:
                changed = asyncio.ensure_future(watch.changed.wait())
                try:
                    await asyncio.wait((read, changed), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if read.done():
                    break
                watch.changed.clear()
                await self._report_changes()
                await self._flush()
            data = await read
        finally:
            if read.done() and not read.cancelled():
                read.exception()  # retrieved: a failure after it is the one raised
            read.cancel()
        self.core.receive_data(data)  # the next event is DONE (or a refusal of what came instead)

    # --- the end --------------------------------------------------------------------------
    async def _finish(self, started_tls: bool) -> None:
        self.core.close()
        self.unwatch()
        box = self.mailbox
        if box is not None:
            with contextlib.suppress(OSError, ImapIndexError, asyncio.CancelledError):
                await self._blocking(box.close)
        log.info(
            "imap session client=%s user=%s tls=%s end=%s compress=%s",
            self.client_ip,
            logfmt.field(self.user or "-"),
            "implicit" if started_tls else ("starttls" if self.conn.tls else "no"),
            logfmt.field(self.outcome),
            "deflate" if self.conn.deflate is not None else "no",
        )
