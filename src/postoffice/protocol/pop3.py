"""The POP3 server protocol, sans I/O: bytes in, events out, replies as bytes.

RFC 1939 (POP3) with RFC 2449 (CAPA, response codes, PIPELINING), RFC 2595
§4 (STLS), RFC 5034 (SASL AUTH) and RFC 3206 (SYS and AUTH codes).

``Pop3Server`` parses command lines and keeps the state machine (RFC 1939
§3: AUTHORIZATION -> TRANSACTION -> UPDATE).  It never decides anything:
the session gets an event, decides (policy, storage) and answers through
``reply_ok`` / ``reply_err`` / ``continuation`` / ``multiline``, and the
answer drives the transition (a ``+OK`` to PASS enters TRANSACTION, a
``-ERR`` to it forgets the USER name, ...).  Commands that are unknown,
malformed or out of state never reach the session as commands: they come
out as ``BadCommand`` with the reason to send.

``MessageEncoder`` turns a stored message (LF or CRLF line endings) into
the wire form RETR and TOP send, chunk by chunk: the one dot-stuffer
(``dotstuff.DotStuffer``, shared with the SMTP client) plus TOP's cut.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from postoffice.protocol.dotstuff import TERMINATOR, DotStuffer, dot_stuff
from postoffice.protocol.errors import LocalProtocolError

# RFC 2449 §4 limits command lines to 255 octets, but SASL responses
# (RFC 5034 §4, like RFC 4954 §4's 12288 for SMTP) and long passwords
# legitimately exceed it; a longer line is refused and skipped to its end
# without being buffered.
MAX_LINE = 12288


class Pop3State(enum.Enum):
    """Where the POP3 dialogue is (``Pop3Server.state``; RFC 1939 §3)."""

    AUTHORIZATION = "authorization"
    SASL = "sasl"  # an AUTH exchange: the next line is a client response
    TLS_PENDING = "tls-pending"  # +OK to STLS sent; nothing is read until the handshake
    TRANSACTION = "transaction"
    CLOSED = "closed"  # after QUIT (RFC 1939 §6: UPDATE) or a fatal error


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capa:
    pass


@dataclass(frozen=True, slots=True)
class Stls:
    pass


@dataclass(frozen=True, slots=True)
class User:
    name: str


@dataclass(frozen=True, slots=True)
class Pass:
    user: str  # from the USER just before (RFC 1939 §7: PASS follows a +OK USER)
    password: str


@dataclass(frozen=True, slots=True)
class Auth:
    mechanism: str | None  # upper case; None: "AUTH" alone, list the mechanisms
    initial: str | None  # the initial response as sent ("=": empty), None if absent


@dataclass(frozen=True, slots=True)
class AuthResponse:
    data: str  # the line answering a continuation: base64, or "*" to cancel (RFC 5034 §4)


@dataclass(frozen=True, slots=True)
class Stat:
    pass


@dataclass(frozen=True, slots=True)
class List:
    msg: int | None


@dataclass(frozen=True, slots=True)
class Uidl:
    msg: int | None


@dataclass(frozen=True, slots=True)
class Retr:
    msg: int


@dataclass(frozen=True, slots=True)
class Top:
    msg: int
    lines: int


@dataclass(frozen=True, slots=True)
class Dele:
    msg: int


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class BadCommand:
    reason: str  # safe to send after "-ERR "


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = (
    Capa
    | Stls
    | User
    | Pass
    | Auth
    | AuthResponse
    | Stat
    | List
    | Uidl
    | Retr
    | Top
    | Dele
    | Noop
    | Rset
    | Quit
    | BadCommand
)

# Which commands each state accepts (RFC 1939 §§4-6, RFC 2449 §5, RFC 2595 §4,
# RFC 5034 §4).  PASS is further tied to a preceding accepted USER.
_ALLOWED: dict[Pop3State, frozenset[str]] = {
    Pop3State.AUTHORIZATION: frozenset({"CAPA", "STLS", "USER", "PASS", "AUTH", "QUIT"}),
    Pop3State.TRANSACTION: frozenset(
        {"CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "NOOP", "RSET", "QUIT"}
    ),
}
_KNOWN = frozenset().union(*_ALLOWED.values()) | {"APOP"}
_MAX_NUMBER_DIGITS = 18


class Pop3Server:
    """The server side of one POP3 connection."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.state = Pop3State.AUTHORIZATION
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long line: drop until its end
        self._user: str | None = None
        self._awaiting: Event | None = None  # the event the session has not answered

    # --- input ----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.state in (Pop3State.CLOSED, Pop3State.TLS_PENDING):
            return  # RFC 2595 §4: nothing sent before the handshake is processed after it
        self._buffer += data

    @property
    def has_buffered_data(self) -> bool:
        return bool(self._buffer) or self._skipping

    def next_event(self) -> Event | _NeedData:
        if self._awaiting is not None:
            raise LocalProtocolError(f"{self._awaiting!r} has not been answered")
        if self.state in (Pop3State.CLOSED, Pop3State.TLS_PENDING):
            return NEED_DATA
        line = self._next_line()
        if line is None:
            return NEED_DATA
        event = self._parse(line) if isinstance(line, bytes) else line
        self._awaiting = event
        return event

    def take_line(self, data: bytes, accept: Callable[[Event], bool]) -> Event | None:
        """A fast path's way in, for input that has just arrived: when nothing
        is buffered and ``data`` is one whole command line, parse it, and if
        ``accept(event)`` says the session can answer that event now, take
        it: the event then awaits its answer exactly as if ``receive_data``
        and ``next_event`` had given it.  Otherwise None, and nothing
        changed: feed ``data`` the ordinary way.  Never in the middle of an
        AUTH exchange (the line is not a command there)."""
        if (
            self._awaiting is not None
            or self._buffer
            or self._skipping
            or self.state not in _ALLOWED
            or not 0 < len(data) <= self.max_line
            or data.find(b"\n") != len(data) - 1  # one line, and all of it
        ):
            return None
        # CRLF per RFC 1939 §3; a bare LF is tolerated, as in _next_line.
        event = self._parse(data[:-2] if data.endswith(b"\r\n") else data[:-1])
        if not accept(event):
            return None
        self._awaiting = event
        return event

    def _next_line(self) -> bytes | BadCommand | None:
        while True:
            end = self._buffer.find(b"\n")
            if self._skipping:
                if end < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: end + 1]
                self._skipping = False
                return BadCommand("Line too long")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    self._buffer.clear()
                    self._skipping = True
                    continue
                return None
            if end + 1 > self.max_line:
                del self._buffer[: end + 1]
                return BadCommand("Line too long")
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            # CRLF per RFC 1939 §3; a bare LF is tolerated, as most servers do.
            return line[:-1] if line.endswith(b"\r") else line

    def _parse(self, raw: bytes) -> Event:
        if b"\0" in raw:
            return BadCommand("NUL in command")
        text = raw.decode("utf-8", errors="replace")
        if self.state is Pop3State.SASL:
            self.state = Pop3State.AUTHORIZATION
            return AuthResponse(text.strip())
        keyword, _sep, rest = text.partition(" ")
        keyword = keyword.upper()
        if not keyword or keyword not in _KNOWN:
            return BadCommand("Unknown command")
        if keyword == "APOP":
            # APOP needs the plain password on the server (RFC 1939 §7);
            # we store only slow hashes, so it is neither offered nor done.
            return BadCommand("APOP is not supported; use USER/PASS or AUTH over TLS")
        if keyword not in _ALLOWED[self.state]:
            return BadCommand(f"{keyword} is not valid in the {self.state.value} state")
        if keyword == "PASS":
            if self._user is None:
                return BadCommand("PASS needs a USER first")
            # RFC 1939 §7: PASS has one argument, so spaces belong to the password.
            return Pass(self._user, rest)
        args = rest.split()
        try:
            return self._command(keyword, args)
        except ValueError as exc:
            return BadCommand(str(exc))

    def _command(self, keyword: str, args: list[str]) -> Event:
        match keyword:
            case "USER":
                _arity(args, 1, 1)
                return User(args[0])
            case "AUTH":
                _arity(args, 0, 2)
                if not args:
                    return Auth(None, None)
                return Auth(args[0].upper(), args[1] if len(args) == 2 else None)
            case "LIST" | "UIDL":
                _arity(args, 0, 1)
                msg = _number(args[0]) if args else None
                return List(msg) if keyword == "LIST" else Uidl(msg)
            case "RETR" | "DELE":
                _arity(args, 1, 1)
                return Retr(_number(args[0])) if keyword == "RETR" else Dele(_number(args[0]))
            case "TOP":
                _arity(args, 2, 2)
                return Top(_number(args[0]), _number(args[1]))
        _arity(args, 0, 0)
        simple: dict[str, Event] = {
            "CAPA": Capa(), "STLS": Stls(), "STAT": Stat(), "NOOP": Noop(),
            "RSET": Rset(), "QUIT": Quit(),
        }  # fmt: skip
        return simple[keyword]

    # --- output ---------------------------------------------------------------
    def greeting(self, text: str) -> bytes:
        return _line("+OK", None, text)

    def reply_ok(self, text: str = "", code: str | None = None) -> bytes:
        """Answer the current event with +OK (the first line, for RETR/TOP)."""
        event = self._answer()
        if self.state is Pop3State.SASL:
            self.state = Pop3State.AUTHORIZATION
        match event:
            case User(name):
                self._user = name
            case Auth(mechanism=None):
                pass  # the mechanism list (AUTH alone) changes nothing
            case Pass() | AuthResponse() | Auth():
                self._user = None
                self.state = Pop3State.TRANSACTION
            case Stls():
                if self.has_buffered_data:
                    # RFC 2595 §4 / CVE-2011-0411: a command pipelined after STLS
                    # would be processed as if it came over TLS.
                    raise LocalProtocolError("STLS accepted with plaintext buffered")
                self._user = None
                self.state = Pop3State.TLS_PENDING
            case Quit():
                self.state = Pop3State.CLOSED
            case BadCommand():
                raise LocalProtocolError("a bad command cannot be answered +OK")
        return _line("+OK", code, text)

    def reply_err(self, text: str, code: str | None = None) -> bytes:
        """Answer the current event with -ERR; ``code`` is an RFC 2449 §8 response code."""
        event = self._answer()
        if self.state is Pop3State.SASL:
            self.state = Pop3State.AUTHORIZATION  # e.g. an over-long response ends the exchange
        match event:
            case User() | Pass() | Auth() | AuthResponse():
                self._user = None  # RFC 1939 §7: after a failed PASS, start again at USER
            case Quit():
                self.state = Pop3State.CLOSED
        return _line("-ERR", code, text)

    def continuation(self, challenge: str = "") -> bytes:
        """A SASL challenge (RFC 5034 §4): the next line is the client's response."""
        event = self._answer()
        if not isinstance(event, Auth | AuthResponse):
            raise LocalProtocolError("continuation outside AUTH")
        self.state = Pop3State.SASL
        return b"+ " + challenge.encode("ascii") + b"\r\n"

    def multiline(self, text: str, lines: Iterable[str]) -> bytes:
        """A complete +OK multi-line reply (CAPA, LIST, UIDL, AUTH), dot-stuffed."""
        head = self.reply_ok(text)
        body = dot_stuff(b"".join(line.encode("utf-8") + b"\r\n" for line in lines), True)
        return head + body + TERMINATOR

    def tls_established(self) -> None:
        """The STLS handshake is done: start AUTHORIZATION again over TLS."""
        if self.state is not Pop3State.TLS_PENDING:
            raise LocalProtocolError("no STLS in progress")
        self._buffer.clear()
        self._skipping = False
        self.state = Pop3State.AUTHORIZATION

    def close(self) -> None:
        self.state = Pop3State.CLOSED

    def _answer(self) -> Event:
        event = self._awaiting
        if event is None:
            raise LocalProtocolError("no command to answer")
        self._awaiting = None
        return event


def capabilities(
    state: Pop3State, *, stls: bool, sasl: tuple[str, ...], implementation: str
) -> list[str]:
    """The CAPA list (RFC 2449 §6) for ``state``.  ``stls``: offer STLS now;
    ``sasl``: mechanisms usable now (empty on a plaintext connection that may
    not log in, so clients are not invited to send a password in clear)."""
    caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    if state is Pop3State.AUTHORIZATION:
        caps.append("USER")
        if sasl:
            caps.append("SASL " + " ".join(sasl))
        if stls:
            caps.append("STLS")
    caps.append(f"IMPLEMENTATION {implementation}")
    return caps


def _line(status: str, code: str | None, text: str) -> bytes:
    parts = [status]
    if code:
        parts.append(f"[{code}]")
    if text:
        parts.append(text)
    # Replies are built from our own texts; CR/LF can never split one in two.
    out = " ".join(parts).replace("\r", " ").replace("\n", " ")
    return out.encode("utf-8") + b"\r\n"


def _arity(args: list[str], low: int, high: int) -> None:
    if not low <= len(args) <= high:
        raise ValueError("Wrong number of arguments")


def _number(text: str) -> int:
    # RFC 1939 §3: message numbers are decimal, no sign; absurd lengths are
    # refused before int() so a hostile argument costs nothing.
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_NUMBER_DIGITS:
        raise ValueError("Invalid number")
    return int(text)


# --- message bodies ----------------------------------------------------------


class MessageEncoder(DotStuffer):
    """Stored message -> RETR/TOP wire form, streamed: the ``DotStuffer``
    (CRLF line endings, dot-stuffing, RFC 1939 §3), optionally cut to the
    header and ``body_lines`` lines of body (TOP, RFC 1939 §7).

    Input may use LF or CRLF line endings (other delivery agents store
    either); every LF not preceded by CR becomes CRLF, which is how Dovecot
    computes the ``W=`` size.  Without a limit, ``unstuffed`` ends as
    ``wire_size`` of the same bytes.
    """

    __slots__ = ("_in_header", "_limit", "done")

    def __init__(self, body_lines: int | None = None) -> None:
        super().__init__()
        self._limit = body_lines
        self._in_header = body_lines is not None
        self.done = False  # the TOP limit was reached: feed nothing more

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        data = self._crlf(chunk)
        if self._limit is not None:
            data = self._cut(data)
        return self._stuff(data)

    def finish(self) -> bytes:
        if self.done:
            self._held_cr = False  # a CR after the last line TOP sends is not sent
        return super().finish()

    def _cut(self, data: bytes) -> bytes:
        """Keep the header, the blank line, and ``_limit`` body lines."""
        pos = 0
        if self._in_header:
            if self._line_start and data.startswith(b"\r\n"):
                pos = 2
            else:
                found = data.find(b"\r\n\r\n")
                if found < 0:
                    return data
                pos = found + 4
            self._in_header = False
        remaining = self._limit or 0
        # A converted chunk never ends inside CRLF (a lone trailing CR is held),
        # so counting CRLFs per chunk counts lines exactly.
        whole_lines = data.count(b"\r\n", pos)
        if whole_lines < remaining:
            self._limit = remaining - whole_lines
            return data
        while remaining > 0:
            pos = data.index(b"\r\n", pos) + 2
            remaining -= 1
        self._limit = 0
        self.done = True
        return data[:pos]


def wire_size(chunks: Iterable[bytes]) -> int:
    """Octets RETR sends for a message (excluding dot-stuffing and the
    terminator): what POP3 LIST and STAT report (RFC 1939 §5)."""
    encoder = DotStuffer()
    for chunk in chunks:
        encoder.feed(chunk)
    encoder.finish()
    return encoder.unstuffed


def retr_wire_form(content: bytes, listed_size: int) -> bytes | None:
    """What RETR sends after its +OK line for a whole stored message
    ``content``: CRLF, dot-stuffed, terminated; None if that is not
    ``listed_size`` octets unstuffed (the file changed since LIST measured
    it), so the caller reads it again the careful way."""
    encoder = MessageEncoder()
    wire = encoder.feed(content) + encoder.finish()
    return wire if encoder.unstuffed == listed_size else None
