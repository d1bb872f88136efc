"""The sans-I/O IMAP server core (RFC 9051 IMAP4rev2, RFC 3501 IMAP4rev1).

The core frames commands (lines and literals, every one bounded), parses
them (``imap_parse``), keeps the connection state (RFC 9051 §3: not
authenticated, authenticated, selected, logout) and turns answers into
bytes (``imap_response``).  It never decides: the session that drives it

1. feeds what it read: ``core.receive_data(data)``;
2. takes events one at a time: ``core.next_event()`` (None: need more);
3. answers each with ``tagged`` (or ``continuation`` for AUTHENTICATE and
   IDLE, ``continue_literal`` for ``LiteralExpected``, ``reply_rejected``
   for ``Rejected``) before asking for the next, and may send ``untagged``
   data at any time (RFC 9051 §5.3: EXISTS, EXPUNGE, FETCH of other
   sessions' changes, while a command is in flight or during IDLE).

A tagged OK applies the transition it means (table at ``tagged``).

Bounds (constructor): a line longer than ``max_line`` is discarded to its
end and answered BAD; a literal is refused before a byte of it is read
when it would pass ``max_append`` (APPEND, RFC 7889 APPENDLIMIT) or make
the command pass ``max_command``: a synchronizing one with ``NO [TOOBIG]``
(the client then never sends it, RFC 9051 §4.3), a non-synchronizing one
(RFC 7888) with ``BAD [TOOBIG]``, its octets and the rest of the command
then skipped if affordable, else the connection ends with BYE.  Nesting
and sequence-set ranges are bounded by ``imap_parse.Limits``.  Bad input
gives a ``Rejected`` event, never an exception.

STARTTLS (RFC 9051 §6.2.1): refused when anything is buffered behind it
(the CVE-2011-0411 injection), and its OK discards nothing silently: the
session must check ``buffered`` (the core raises if it did not).
"""

from __future__ import annotations

import enum
import re
from typing import Final

from postoffice.protocol import imap_events as ev
from postoffice.protocol.errors import LocalProtocolError
from postoffice.protocol.imap_parse import (
    Limits,
    ParseError,
    command_name,
    parse_command,
    parse_tag,
)
from postoffice.protocol.imap_response import (
    Atom,
    ResponseCode,
    Value,
    continuation,
    status_line,
    untagged,
)

MAX_LINE: Final = 65536  # RFC 9051 §4: at least 8192; Dovecot's is 64 KiB
MAX_COMMAND: Final = 1 << 20  # one command's lines and literals, APPEND's message aside
MAX_APPEND: Final = 50 << 20  # APPENDLIMIT (RFC 7889)
LITERAL_MINUS_MAX: Final = 4096  # RFC 7888 §4: the LITERAL- bound on {n+}

# A line ending in a literal announcement (RFC 9051 §9 literal, RFC 7888,
# RFC 3516 literal8).  Digits are bounded so int() costs nothing.
_LITERAL_MARK = re.compile(rb"(~?)\{(\d{1,20})([+-]?)\}\Z")
_TAIL = 32  # octets kept of a discarded over-long line, to see its literal mark


class ImapState(enum.Enum):
    """RFC 9051 §3, plus the in-between modes of one command."""

    NOT_AUTHENTICATED = "not-authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"
    SASL = "sasl"  # an AUTHENTICATE exchange: lines are SASL responses
    IDLE = "idle"  # RFC 2177: only DONE is read
    TLS_PENDING = "tls-pending"  # OK to STARTTLS sent; nothing read until the handshake


_ANY = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})
_AUTHENTICATED = _ANY | {
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
    "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "GETQUOTAROOT", "GETQUOTA", "COMPRESS",
}  # fmt: skip
# Which commands each state accepts (RFC 9051 §6.1-§6.4; ENABLE only before
# a mailbox is selected, RFC 5161 §3.1).
_ALLOWED: dict[ImapState, frozenset[str]] = {
    ImapState.NOT_AUTHENTICATED: _ANY | {"STARTTLS", "AUTHENTICATE", "LOGIN"},
    ImapState.AUTHENTICATED: _AUTHENTICATED | {"ENABLE"},
    ImapState.SELECTED: _AUTHENTICATED
    | {"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE"},
}
_STARTTLS_PIPELINED = "STARTTLS must be the last command sent before the handshake"
_KNOWN = frozenset().union(*_ALLOWED.values())
_UTF8_MODES = frozenset({"IMAP4REV2", "UTF8=ACCEPT"})  # RFC 9051 §3.? / RFC 6855 §3


_DEFAULT_LIMITS: Final = Limits()


class _TooLong:
    __slots__ = ("head", "tail")

    def __init__(self, head: bytes, tail: bytes) -> None:
        self.head = head
        self.tail = tail


class ImapServerCore:
    """One IMAP server connection's protocol state; see the module docstring."""

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE,
        max_command: int = MAX_COMMAND,
        max_append: int = MAX_APPEND,
        literal_plus: bool = True,
        limits: Limits = _DEFAULT_LIMITS,
        tls: bool = False,
    ) -> None:
        """``literal_plus``: LITERAL+ is offered (else LITERAL-: non-synchronizing
        literals up to 4096 octets, RFC 7888 §4).  ``tls``: implicit TLS."""
        self.max_line = max_line
        self.max_command = max_command
        self.max_append = max_append
        self.literal_plus = literal_plus
        self.limits = limits
        self.tls = tls
        self.utf8 = False  # IMAP4rev2 or UTF8=ACCEPT enabled: names and strings in UTF-8
        self.enabled: set[str] = set()
        self.compressed = False
        self.error_count = 0
        self._state = ImapState.NOT_AUTHENTICATED
        self._mode: ImapState | None = None  # SASL, IDLE, TLS_PENDING over _state
        self._mode_tag = ""  # the AUTHENTICATE or IDLE command's tag
        self._buf = bytearray()
        self._cmd = bytearray()  # the command being framed
        self._cmd_tag: str | None = None
        self._cmd_name = ""
        self._literal_left = 0  # octets of an accepted literal still to come
        self._discard_left = 0  # octets of a refused literal to skip
        self._skip_command = False  # skipping the rest of a refused command
        self._skipping_line = False  # inside an over-long line
        self._skip_head = b""
        self._skip_tail = b""
        self._pending: ev.Event | None = None

    # --- properties -------------------------------------------------------------
    @property
    def state(self) -> ImapState:
        return self._mode or self._state

    @property
    def buffered(self) -> int:
        """Octets received and not yet turned into events."""
        return len(self._buf)

    # --- input ------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self._state is ImapState.LOGOUT or self._mode is ImapState.TLS_PENDING:
            return  # RFC 9051 §6.2.1: nothing before the handshake counts after it
        self._buf += data

    def next_event(self) -> ev.Event | None:
        """The next event, or None when more data is needed."""
        if self._pending is not None:
            raise LocalProtocolError(f"answer {type(self._pending).__name__} first")
        if self._state is ImapState.LOGOUT or self._mode is ImapState.TLS_PENDING:
            return None
        event = self._next()
        if event is not None:
            self._pending = event
            if isinstance(event, ev.Rejected):
                self.error_count += 1
        return event

    def _next(self) -> ev.Event | None:
        while True:
            if self._discard_left:
                n = min(self._discard_left, len(self._buf))
                del self._buf[:n]
                self._discard_left -= n
                if self._discard_left:
                    return None
                continue
            if self._literal_left:
                n = min(self._literal_left, len(self._buf))
                self._cmd += self._buf[:n]
                del self._buf[:n]
                self._literal_left -= n
                if self._literal_left:
                    return None
                continue
            line = self._take_line()
            if line is None:
                return None
            if isinstance(line, _TooLong):
                event = self._too_long(line)
                if event is None:
                    continue
                return event
            if self._mode is ImapState.SASL:
                return ev.AuthResponse(self._mode_tag, line.decode("utf-8", "replace"))
            if self._mode is ImapState.IDLE:
                self._mode = None
                if line.upper() == b"DONE":
                    return ev.IdleDone(self._mode_tag)
                return ev.Rejected(self._mode_tag, "Expected DONE")
            event = self._line(line)
            if event is not None:
                return event

    def _take_line(self) -> bytes | _TooLong | None:
        buf = self._buf
        end = buf.find(b"\n")
        if self._skipping_line:
            if end < 0:
                self._skip_tail = (self._skip_tail + buf[-_TAIL:])[-_TAIL:]
                buf.clear()
                return None
            tail = (self._skip_tail + buf[:end])[-_TAIL:]
            del buf[: end + 1]
            self._skipping_line = False
            return _TooLong(self._skip_head, tail.rstrip(b"\r"))
        if end < 0:
            if len(buf) > self.max_line:
                self._skip_head = bytes(buf[:64])
                self._skip_tail = bytes(buf[-_TAIL:])
                buf.clear()
                self._skipping_line = True
            return None
        if end + 1 > self.max_line:
            line = bytes(buf[:end]).rstrip(b"\r")
            del buf[: end + 1]
            return _TooLong(line[:64], line[-_TAIL:])
        line = bytes(buf[:end])
        del buf[: end + 1]
        # CRLF per RFC 9051 §2.2; a bare LF is tolerated, as most servers do.
        return line[:-1] if line.endswith(b"\r") else line

    def _too_long(self, line: _TooLong) -> ev.Event | None:
        if self._mode is not None:
            self._mode = None  # an unreadable SASL response or DONE ends the mode
            return ev.Rejected(self._mode_tag, "Line too long")
        tag = self._cmd_tag if self._cmd else parse_tag(line.head)
        return self._refuse(tag, "Line too long", line.tail)

    def _line(self, line: bytes) -> ev.Event | None:
        if self._skip_command:
            # The rest of a refused command: skip to its last line.
            mark = _LITERAL_MARK.search(line)
            if mark is None or not mark.group(3):
                self._skip_command = False
                return None
            return self._skip_literal(int(mark.group(2)), None)
        first = not self._cmd
        if first:
            self._cmd_tag = parse_tag(line)
            self._cmd_name = command_name(line)
            refusal = self._check_first(line)
            if refusal is not None:
                return self._refuse(self._cmd_tag, refusal, line)
        self._cmd += line
        mark = _LITERAL_MARK.search(line)
        if mark is None:
            data = bytes(self._cmd)
            self._reset_command()
            return self._parse(data)
        size = int(mark.group(2))
        sync = not mark.group(3)
        appending = self._cmd_name == "APPEND"
        cap = self.max_command + (self.max_append if appending else 0)
        too_big = len(self._cmd) + size > cap or (appending and size > self.max_append)
        if not sync and not self.literal_plus and size > LITERAL_MINUS_MAX:
            too_big = True
        if too_big:
            tag = self._cmd_tag
            self._reset_command()
            if sync:
                return ev.Rejected(tag, "Literal too big", "NO", "TOOBIG")
            return self._skip_literal(size, ev.Rejected(tag, "Literal too big", "BAD", "TOOBIG"))
        self._cmd += b"\r\n"
        self._literal_left = size
        if sync:
            return ev.LiteralExpected(self._cmd_tag or "", size)
        return None

    def _check_first(self, line: bytes) -> str | None:
        if self._cmd_tag is None:
            return "Missing or invalid tag"
        name = self._cmd_name
        if name not in _KNOWN:
            return "Unknown command"
        if name not in _ALLOWED[self._state]:
            return f"{name} is not valid in the {self._state.value} state"
        if name == "STARTTLS":
            if self.tls:
                return "TLS is already active"
            if self._buf:
                return _STARTTLS_PIPELINED
        return None

    def _refuse(self, tag: str | None, text: str, line: bytes) -> ev.Event | None:
        """Refuse the command being framed, whose last line so far is ``line``;
        a non-synchronizing literal announced at its end is skipped unread."""
        self._reset_command()
        event = ev.Rejected(tag, text)
        if text == _STARTTLS_PIPELINED:
            return ev.Rejected(tag, text, fatal=True)
        mark = _LITERAL_MARK.search(line)
        if mark is not None and mark.group(3):
            return self._skip_literal(int(mark.group(2)), event)
        return event

    def _skip_literal(self, size: int, event: ev.Rejected | None) -> ev.Event | None:
        """Skip ``size`` octets the client sends unasked, and the rest of its
        command, when affordable; otherwise end the connection."""
        if size > self.max_command:
            tag = event.tag if event is not None else None
            text = event.text if event is not None else "Command refused"
            return ev.Rejected(tag, text, "BAD", event.code if event else None, fatal=True)
        self._discard_left = size
        self._skip_command = True
        return event

    def _parse(self, data: bytes) -> ev.Event:
        try:
            event = parse_command(data, utf8=self.utf8, limits=self.limits)
        except ParseError as exc:
            return ev.Rejected(parse_tag(data), exc.text, exc.status, exc.code)
        except RecursionError:  # pragma: no cover - Limits.max_depth prevents it
            return ev.Rejected(parse_tag(data), "Nested too deeply")
        return event

    def _reset_command(self) -> None:
        self._cmd = bytearray()
        self._cmd_tag = None
        self._cmd_name = ""
        self._literal_left = 0

    # --- output -------------------------------------------------------------------
    def tagged(self, status: str, text: str = "", code: ResponseCode | None = None) -> bytes:
        """Answer the pending event with a tagged OK, NO or BAD.

        ===========================  ======  ==================================
        event                        status  effect
        ===========================  ======  ==================================
        Login, Authenticate,         OK      authenticated
        AuthResponse                 any     SASL exchange over
        Select (and EXAMINE)         OK      selected
        Select                       NO      authenticated (RFC 9051 §6.3.2)
        Close, Unselect              OK      authenticated
        Logout                       any     logout
        StartTls                     OK      TLS pending: nothing read until
                                             ``tls_established``
        Compress                     OK      ``compressed``; ``take_buffered``
        LiteralExpected              NO/BAD  the command is abandoned
        ===========================  ======  ==================================
        """
        event = self._answer()
        if status not in ("OK", "NO", "BAD"):
            raise LocalProtocolError(f"{status} is not a tagged status")
        if isinstance(event, ev.LiteralExpected):
            if status == "OK":
                raise LocalProtocolError("a literal is accepted with continue_literal()")
            self._reset_command()
        ok = status == "OK"
        match event:
            case ev.Login() | ev.Authenticate() | ev.AuthResponse():
                self._mode = None
                if ok:
                    self._state = ImapState.AUTHENTICATED
            case ev.Select() if ok:
                self._state = ImapState.SELECTED
            case ev.Select() if status == "NO":
                self._state = ImapState.AUTHENTICATED
            case ev.Close() | ev.Unselect() if ok:
                self._state = ImapState.AUTHENTICATED
            case ev.Logout():
                self._state = ImapState.LOGOUT
            case ev.StartTls() if ok:
                if self._buf:
                    raise LocalProtocolError("STARTTLS accepted with plaintext buffered")
                self._mode = ImapState.TLS_PENDING
            case ev.Compress() if ok:
                self.compressed = True
            case ev.Idle():
                self._mode = None
        return status_line(event.tag, status, text, code, utf8=self.utf8)

    def reply_rejected(self) -> bytes:
        """Answer a pending ``Rejected`` as it says (and ``* BYE`` if fatal)."""
        event = self._pending
        if not isinstance(event, ev.Rejected):
            raise LocalProtocolError("no Rejected event to answer")
        self._pending = None
        code = None
        if event.code == "BADCHARSET":
            code = ResponseCode("BADCHARSET", ([Atom("UTF-8"), Atom("US-ASCII")],))
        elif event.code:
            code = ResponseCode(event.code)
        out = status_line(event.tag, event.status, event.text, code, utf8=self.utf8)
        if event.fatal:
            out += self.bye("Too much input refused")
        return out

    def continuation(self, text: str = "") -> bytes:
        """``+ text``: a SASL challenge (base64) to Authenticate/AuthResponse,
        or the "idling" answer to Idle (RFC 2177 §3)."""
        event = self._answer()
        match event:
            case ev.Authenticate(tag=tag) | ev.AuthResponse(tag=tag):
                self._mode = ImapState.SASL
            case ev.Idle(tag=tag):
                self._mode = ImapState.IDLE
            case _:
                self._pending = event
                raise LocalProtocolError(f"no continuation for {type(event).__name__}")
        self._mode_tag = tag
        return continuation(text)

    def continue_literal(self, text: str = "Ready for literal data") -> bytes:
        """Accept a pending ``LiteralExpected``: the client sends it now."""
        event = self._pending
        if not isinstance(event, ev.LiteralExpected):
            raise LocalProtocolError("no literal awaits a continuation")
        self._pending = None
        return continuation(text)

    def untagged(self, *values: Value) -> bytes:
        """Untagged data, at any time: ``core.untagged(3, Atom("EXISTS"))``."""
        return untagged(*values, utf8=self.utf8)

    def untagged_status(self, status: str, text: str, code: ResponseCode | None = None) -> bytes:
        """``* OK [code] text`` (or NO, BAD) at any time."""
        if status not in ("OK", "NO", "BAD"):
            raise LocalProtocolError("BYE and PREAUTH have their own methods")
        return status_line(None, status, text, code, utf8=self.utf8)

    def greeting(
        self, text: str, code: ResponseCode | None = None, *, preauth: bool = False
    ) -> bytes:
        """The server greeting (RFC 9051 §7.1.1/§7.1.4): OK, or PREAUTH."""
        if preauth:
            self._state = ImapState.AUTHENTICATED
        return status_line(None, "PREAUTH" if preauth else "OK", text, code, utf8=self.utf8)

    def bye(self, text: str) -> bytes:
        """``* BYE``: the server ends the connection (RFC 9051 §7.1.5)."""
        self._state = ImapState.LOGOUT
        self._mode = None
        self._buf.clear()
        return status_line(None, "BYE", text, utf8=self.utf8)

    def enable(self, capability: str) -> None:
        """The session enabled ``capability`` (ENABLE, RFC 5161): IMAP4rev2 or
        UTF8=ACCEPT switch names and strings to UTF-8 (RFC 9051, RFC 6855)."""
        name = capability.upper()
        self.enabled.add(name)
        if name in _UTF8_MODES:
            self.utf8 = True

    def tls_established(self) -> None:
        if self._mode is not ImapState.TLS_PENDING:
            raise LocalProtocolError("no STARTTLS in progress")
        self._mode = None
        self._buf.clear()
        self.tls = True

    def take_buffered(self) -> bytes:
        """Octets received but not parsed (after COMPRESS's OK they are
        compressed: the session inflates them and feeds them back)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def close(self) -> None:
        self._pending = None
        self._state = ImapState.LOGOUT
        self._mode = None
        self._buf.clear()

    def _answer(self) -> ev.Event:
        event = self._pending
        if event is None:
            raise LocalProtocolError("no command to answer")
        self._pending = None
        return event
