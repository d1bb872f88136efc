"""The sans-I/O SMTP server core (RFC 5321, with ESMTP extensions).

The core parses command lines, keeps the command sequence and turns replies
into bytes; it never decides policy.  The session that drives it:

1. feeds whatever it read: ``core.receive_data(data)``;
2. takes events one at a time: ``event = core.next_event()`` (``None``: need
   more data);
3. answers every event except ``DataChunk`` with ``core.send(reply)`` before
   asking for the next one, and writes the returned bytes.

``send`` also applies the state transition that the reply means for the
event being answered (table in ``SmtpServerCore.send``), so the session
never tracks SMTP sequence itself.

Events the core can judge alone (unknown commands, syntax errors, bad
sequence, overlong lines) come out as ``Rejected(reply)``; the session
answers them with ``reply`` (or its own) and may drop a client whose
``error_count`` grows too large.

PIPELINING (RFC 2920): several commands may arrive in one chunk; events come
out in order, one per ``next_event``.  Bytes after a DATA command stay
buffered: they are message content if the session answers 354, commands
otherwise.  After ``StartTls`` is answered with 220, everything still
buffered is discarded (RFC 3207 §4.2: plaintext sent before the TLS
handshake must not be acted upon once TLS is up); the session refuses a
STARTTLS with data behind it (``buffered``) and ends the dialogue with
``close``.

CHUNKING (RFC 3030): ``BDAT n [LAST]`` is followed by exactly n octets of
content, read by count, never parsed as lines.  Each chunk comes out as
``ChunkStart`` (no answer: the session opens its transaction at the first),
``DataChunk`` events (decoded as DATA's are: CRLF to LF, bare CR/LF flagged,
no dot-stuffing), then ``ChunkComplete`` to answer; a last chunk's carries
the ``DataComplete`` the DATA end path takes.  A BDAT that cannot be
accepted (no MAIL, no recipient, after DATA's turn) is still read to its
last octet before its ``Rejected`` comes out, so the dialogue stays in step
(RFC 3030 §2).  A BDAT whose count cannot be read leaves no way to find the
next command: it is answered 501 and the dialogue closes.

Recipient ``<postmaster>`` without a domain (RFC 5321 §4.1.1.3) is reported
as ``Address("postmaster", "")``: the session substitutes its own domain.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from postoffice.mail.address import Address, AddressError, parse_path
from postoffice.protocol import dsn_params
from postoffice.protocol.dsn_params import (
    NO_MESSAGE_DSN,
    NO_RECIPIENT_DSN,
    MessageDsn,
    RecipientDsn,
)
from postoffice.protocol.errors import LocalProtocolError
from postoffice.protocol.smtp_data import DataDecoder
from postoffice.protocol.smtp_reply import Reply

# RFC 4954 §4: AUTH command lines and SASL responses may be up to 12288
# octets, more than the 512 of an ordinary command line.
MAX_AUTH_LINE = 12288
# RFC 3461 §4: with DSN, MAIL may be 100 characters longer (ENVID) and RCPT
# 500 (ORCPT); the keywords themselves and RET/NOTIFY's words come on top.
DSN_MAIL_EXTRA = 100 + len(" ENVID= RET=HDRS")
DSN_RCPT_EXTRA = 500 + len(" ORCPT= NOTIFY=SUCCESS,FAILURE,DELAY")
MAX_SIZE_DIGITS = 20  # RFC 1870 §3: size-value ::= 1*20DIGIT


class SmtpState(enum.Enum):
    """Where the SMTP dialogue is (``SmtpServerCore.state``)."""

    START = "start"  # no successful HELO/EHLO yet (again so after STARTTLS)
    GREETED = "greeted"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # receiving message content
    AUTH = "auth"  # a SASL exchange is in progress
    CLOSED = "closed"  # QUIT answered with 221, or 421 sent


# --- events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO (``extended``) or HELO with the client's name for itself."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM; ``sender`` None is the null reverse-path ``<>``.

    ``params`` holds every ESMTP parameter given, keys upper-cased (SIZE,
    BODY, SMTPUTF8, AUTH, RET, ENVID); ``size``, ``body`` (``"7BIT"`` or
    ``"8BITMIME"``) and ``smtputf8`` are the parsed forms of the first three,
    ``dsn`` of RET and ENVID (RFC 3461).
    """

    sender: Address | None
    size: int | None
    body: str | None
    smtputf8: bool
    params: dict[str, str | None]
    dsn: MessageDsn = NO_MESSAGE_DSN


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO; ``params`` may hold NOTIFY and ORCPT (RFC 3461).

    A bare ``<postmaster>`` is ``Address("postmaster", "")``.
    """

    recipient: Address
    params: dict[str, str | None]
    dsn: RecipientDsn = NO_RECIPIENT_DSN


@dataclass(frozen=True, slots=True)
class DataRequested:
    """A valid DATA command: answer 354 to receive the content, or refuse."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message content, un-dot-stuffed, LF line endings.  Needs no answer.

    ``newlines`` is how many LF octets ``data`` holds (counted while decoding,
    so a store need not count again), or -1 when not known.
    """

    data: bytes
    newlines: int = field(default=-1, compare=False)


@dataclass(frozen=True, slots=True)
class DataComplete:
    """The end of the content (``<CRLF>.<CRLF>``); see ``smtp_data.DataDecoder``.

    ``size`` counts decoded octets (LF line endings) of the whole message,
    including any beyond the limit when ``oversize``.
    """

    size: int
    bare_cr: bool
    bare_lf: bool
    line_too_long: bool
    oversize: bool


@dataclass(frozen=True, slots=True)
class ChunkStart:
    """``BDAT size [LAST]`` accepted by the core; its content follows.  Needs
    no answer (the answer comes after the chunk, at ``ChunkComplete``)."""

    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class ChunkComplete:
    """A BDAT chunk read to its last octet; answer 250 to take it.

    ``content``: the message so far, judged as DATA's end is (sizes in
    decoded octets); final when ``last``.  Any answer but 2xx ends the
    transaction (RFC 3030 §2: the client sends no more chunks of it).
    """

    size: int
    last: bool
    content: DataComplete


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET."""


@dataclass(frozen=True, slots=True)
class Noop:
    """NOOP."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT."""


@dataclass(frozen=True, slots=True)
class Verify:
    """VRFY with its (non-empty) argument."""

    argument: str


@dataclass(frozen=True, slots=True)
class Help:
    """HELP with its argument ("" if none)."""

    argument: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS (RFC 3207); answer 220 and then start the handshake."""


@dataclass(frozen=True, slots=True)
class Auth:
    """AUTH (RFC 4954): ``mechanism`` upper-cased; ``initial_response`` as sent.

    An initial response of ``"="`` means an empty one (RFC 4954 §4).
    """

    mechanism: str
    initial_response: str | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A client line during a SASL exchange; ``"*"`` means the client cancels."""

    line: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A command the core refuses by itself; answer with ``reply``.

    ``command``: the verb it refused, lower case ("mail"), or "" for a line
    that is no command of ours (for the session's tally of commands)."""

    reply: Reply
    command: str = ""


Event = (
    Hello
    | MailFrom
    | RcptTo
    | DataRequested
    | DataChunk
    | DataComplete
    | ChunkStart
    | ChunkComplete
    | Reset
    | Noop
    | Quit
    | Verify
    | Help
    | StartTls
    | Auth
    | AuthResponse
    | Rejected
)

# --- parsing helpers ------------------------------------------------------------

_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 §4.1.2 esmtp-value: %d33-60 / %d62-126, extended with UTF-8 by
# RFC 6531 §3.3.
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")  # RFC 4422 §3.1
_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "SEND", "SOML", "SAML"})


def _reject(code: int, text: str, enhanced: str) -> Rejected:
    return Rejected(Reply(code, text, enhanced))


_SEQUENCE = "5.5.1"


def _split_path(text: str) -> tuple[str, str] | None:
    """Split ``<path> params`` at the ``>`` that closes the path (quotes respected)."""
    if not text.startswith("<"):
        return None
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return text[: i + 1], text[i + 1 :]
    return None


def _parse_params(text: str) -> dict[str, str | None] | Rejected:
    """ESMTP parameters (RFC 5321 §4.1.2): ``KEY[=VALUE]`` separated by spaces."""
    params: dict[str, str | None] = {}
    for item in filter(None, text.split(" ")):
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key) or (eq and not _ESMTP_VALUE.fullmatch(value)):
            return _reject(501, f"Bad parameter syntax: {item[:40]}", "5.5.4")
        key = key.upper()
        if key in params:
            return _reject(501, f"Parameter {key} given twice", "5.5.4")
        params[key] = value if eq else None
    return params


def _split_command(line: str, prefix: str) -> tuple[str, dict[str, str | None]] | Rejected:
    """``FROM:<path> params`` -> (path, params); lenient about a space after the colon."""
    if line[: len(prefix)].upper() != prefix:
        return _reject(501, f"Syntax: {prefix}<address>", "5.5.2")
    rest = line[len(prefix) :].lstrip(" ")
    split = _split_path(rest)
    if split is None:
        return _reject(501, f"Syntax: {prefix}<address>", "5.5.2")
    path, tail = split
    if tail and not tail.startswith(" "):
        return _reject(501, f"Syntax: {prefix}<address>", "5.5.2")
    params = _parse_params(tail)
    if isinstance(params, Rejected):
        return params
    return path, params


def parse_mail(arg: str) -> MailFrom | Rejected:
    """The argument of MAIL (``FROM:<path> [params]``) -> MailFrom or Rejected."""
    split = _split_command(arg, "FROM:")
    if isinstance(split, Rejected):
        return split
    path, params = split
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret, envid = "", ""
    requiretls = False
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870 §3: size-value ::= 1*20DIGIT
            if value is None or not (value.isascii() and value.isdigit()):
                return _reject(501, "SIZE needs a number", "5.5.4")
            # More digits than the grammar allows is still a number, and one
            # past every limit: the session answers it 552 5.3.4 like any
            # other size it cannot take (RFC 1870 §6.1), never converting it.
            size = int(value) if len(value) <= MAX_SIZE_DIGITS else 10**MAX_SIZE_DIGITS
        elif key == "BODY":  # RFC 6152
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return _reject(501, "BODY must be 7BIT or 8BITMIME", "5.5.4")
            body = value.upper()
        elif key == "SMTPUTF8":  # RFC 6531 §3.4: no value
            if value is not None:
                return _reject(501, "SMTPUTF8 takes no value", "5.5.4")
            smtputf8 = True
        elif key == "RET":  # RFC 3461 §4.3
            parsed = dsn_params.parse_ret(value)
            if parsed is None:
                return _reject(501, "RET must be FULL or HDRS", "5.5.4")
            ret = parsed
        elif key == "ENVID":  # RFC 3461 §4.4: xtext, at most 100 characters
            if not dsn_params.valid_envid(value):
                return _reject(501, "ENVID needs an xtext value of at most 100 characters", "5.5.4")
            envid = value or ""
        elif key == "REQUIRETLS":  # RFC 8689 §4.1: no value
            if value is not None:
                return _reject(501, "REQUIRETLS takes no value", "5.5.4")
            requiretls = True
        elif key == "AUTH":  # RFC 4954 §5
            if value is None or not dsn_params.XTEXT.fullmatch(value):
                return _reject(501, f"{key} needs an xtext value", "5.5.4")
        else:
            return _reject(555, f"Unsupported parameter {key}", "5.5.4")
    if not smtputf8 and not path.isascii():
        # RFC 6531 §3.5: a non-ASCII address without SMTPUTF8.
        return _reject(553, "Non-ASCII address requires SMTPUTF8", "5.6.7")
    try:
        sender = parse_path(path, utf8=smtputf8)
    except AddressError as exc:
        return _reject(501, f"Bad sender address: {exc}", "5.1.7")
    return MailFrom(sender, size, body, smtputf8, params, MessageDsn(ret, envid, requiretls))


def parse_rcpt(arg: str, *, utf8: bool) -> RcptTo | Rejected:
    """The argument of RCPT (``TO:<path> [params]``) -> RcptTo or Rejected."""
    split = _split_command(arg, "TO:")
    if isinstance(split, Rejected):
        return split
    path, params = split
    notify: frozenset[str] | None = None
    orcpt = ""
    for key, value in params.items():
        if key == "NOTIFY":  # RFC 3461 §4.1
            notify = dsn_params.parse_notify(value)
            if notify is None:
                return _reject(501, "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY", "5.5.4")
        elif key == "ORCPT":  # RFC 3461 §4.2: addr-type ";" xtext, at most 500 characters
            if not dsn_params.valid_orcpt(value):
                return _reject(
                    501, "ORCPT must be addr-type;xtext of at most 500 characters", "5.5.4"
                )
            orcpt = value or ""
        else:
            return _reject(555, f"Unsupported parameter {key}", "5.5.4")
    if path.lower() == "<postmaster>":
        return RcptTo(Address("postmaster", ""), params, RecipientDsn(notify, orcpt))
    if not utf8 and not path.isascii():
        return _reject(553, "Non-ASCII address requires SMTPUTF8", "5.6.7")
    try:
        recipient = parse_path(path, utf8=utf8)
    except AddressError as exc:
        return _reject(501, f"Bad recipient address: {exc}", "5.1.3")
    if recipient is None:
        return _reject(501, "Bad recipient address: <> is not a recipient", "5.1.3")
    return RcptTo(recipient, params, RecipientDsn(notify, orcpt))


def _valid_hello_name(name: str) -> bool:
    # Lenient (RFC 5321 §4.1.4 asks for a domain or address literal, but
    # many clients send less): one token of printable characters.
    return bool(name) and name.isprintable() and not any(ch.isspace() for ch in name)


# --- the core -------------------------------------------------------------------


class SmtpServerCore:
    """One SMTP server connection's protocol state; see the module docstring."""

    def __init__(
        self,
        max_message_size: int,
        max_command_line: int = 512,
        max_text_line: int = 998,
        *,
        tls: bool = False,
    ) -> None:
        """``tls``: the connection is already encrypted (implicit TLS, RFC 8314 §3.3).

        It makes STARTTLS a bad sequence (503) and shows in ``core.tls``.
        """
        self.max_message_size = max_message_size
        self.max_command_line = max_command_line  # octets, CRLF included
        self.max_text_line = max_text_line
        self.error_count = 0
        self.tls = tls
        self.authenticated = False
        self.extended = False  # the last successful greeting was EHLO
        self.discarded_after_starttls = 0  # octets dropped by the RFC 3207 defence
        self._buf = bytearray()
        self._pos = 0  # start of unparsed input in _buf
        self._scan_from = 0  # no LF in _buf before this index (saves rescans)
        # In DATA mode, input read while _buf is empty is kept as received
        # (no copying) and goes straight to the decoder.
        self._data_in: deque[bytes] = deque()
        self._discarding = False  # skipping the rest of an overlong line
        self._greeted = False
        self._in_transaction = False
        self._smtputf8 = False
        self._recipients = 0
        self._sasl = False
        self._closed = False
        self._decoder: DataDecoder | None = None
        self._data_complete: DataComplete | None = None  # queued behind a last chunk
        self._pending: Event | None = None  # the event awaiting send()
        # BDAT (RFC 3030): the chunk being read, and the decoder of the whole
        # message (it spans the chunks: size limit, line state).
        self._chunk: ChunkStart | None = None
        self._chunk_left = 0  # octets of the chunk still to read
        self._chunk_refusal: Rejected | None = None  # its answer, once it is read
        self._bdat: DataDecoder | None = None
        self._hang_up = False  # close once the pending event is answered

    # --- properties -----------------------------------------------------------
    @property
    def state(self) -> SmtpState:
        if self._closed:
            return SmtpState.CLOSED
        if self._decoder is not None or self._chunk is not None:
            return SmtpState.DATA
        if self._sasl:
            return SmtpState.AUTH
        if self._in_transaction:
            return SmtpState.RCPT if self._recipients else SmtpState.MAIL
        return SmtpState.GREETED if self._greeted else SmtpState.START

    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    @property
    def recipient_count(self) -> int:
        return self._recipients

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def greeted(self) -> bool:
        return self._greeted

    @property
    def chunking(self) -> bool:
        """A BDAT transaction is under way (RFC 3030: DATA is refused in it)."""
        return self._bdat is not None

    @property
    def buffered(self) -> int:
        """Octets received and not yet turned into events."""
        return len(self._buf) - self._pos + sum(map(len, self._data_in))

    # --- input ----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client; events come from ``next_event``."""
        if self._closed or not data:
            return
        receiving_content = (
            self._decoder is not None and self._data_complete is None
        ) or self._chunk_left > 0
        if receiving_content and self._pos == len(self._buf):
            self._data_in.append(bytes(data))
            return
        if self._pos:
            del self._buf[: self._pos]
            self._scan_from = max(0, self._scan_from - self._pos)
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed (or the dialogue is over)."""
        if self._pending is not None:
            raise LocalProtocolError(
                f"answer {type(self._pending).__name__} with send() before next_event()"
            )
        if self._closed:
            return None
        event: Event | None
        if self._chunk is not None:
            event = self._next_chunk_event()
        elif self._decoder is not None:
            event = self._next_data_event()
        else:
            event = self._next_command_event()
        if event is not None and not isinstance(event, DataChunk | ChunkStart):
            self._pending = event
            if isinstance(event, Rejected):
                self.error_count += 1
        return event

    def _next_data_event(self) -> DataChunk | DataComplete | None:
        decoder = self._decoder
        assert decoder is not None
        if self._data_complete is None:
            if self._pos < len(self._buf):  # pipelined after DATA, before the 354
                self._data_in.appendleft(bytes(memoryview(self._buf)[self._pos :]))
                self._clear_buffer()
            while self._data_complete is None:
                if not self._data_in:
                    return None
                content, rest = decoder.feed(self._data_in.popleft())
                if rest is not None:
                    # What follows the end of data is commands again.
                    self._buf += rest
                    self._buf += b"".join(self._data_in)
                    self._data_in.clear()
                    self._data_complete = DataComplete(
                        decoder.size,
                        decoder.bare_cr,
                        decoder.bare_lf,
                        decoder.line_too_long,
                        decoder.oversize,
                    )
                if content:
                    return DataChunk(content, decoder.newlines)
        event, self._data_complete = self._data_complete, None
        self._decoder = None
        return event

    def _next_chunk_event(self) -> DataChunk | ChunkComplete | Rejected | None:
        """Read the current BDAT chunk by its count (RFC 3030 §2)."""
        chunk = self._chunk
        assert chunk is not None
        if self._chunk_left and self._pos < len(self._buf):  # pipelined behind BDAT
            self._data_in.appendleft(bytes(memoryview(self._buf)[self._pos :]))
            self._clear_buffer()
        decoder = self._bdat if self._chunk_refusal is None else None
        while self._chunk_left:
            if not self._data_in:
                return None
            piece = self._data_in.popleft()
            if len(piece) > self._chunk_left:
                # What follows the chunk is commands again.
                self._buf += memoryview(piece)[self._chunk_left :]
                self._buf += b"".join(self._data_in)
                self._data_in.clear()
                piece = piece[: self._chunk_left]
            self._chunk_left -= len(piece)
            if decoder is not None:
                final = chunk.last and not self._chunk_left
                content = decoder.feed_octets(piece, final)
                if content:
                    return DataChunk(content, decoder.newlines)
        if decoder is not None and chunk.last and not decoder.done:
            content = decoder.feed_octets(b"", True)  # BDAT 0 LAST: a CR held back
            if content:
                return DataChunk(content, decoder.newlines)
        self._chunk = None
        if decoder is None:
            refusal, self._chunk_refusal = self._chunk_refusal, None
            assert refusal is not None
            return refusal
        return ChunkComplete(
            chunk.size,
            chunk.last,
            DataComplete(
                decoder.size,
                decoder.bare_cr,
                decoder.bare_lf,
                decoder.line_too_long,
                decoder.oversize,
            ),
        )

    def _line_limit(self) -> int:
        """The longest allowed line for what is being received now, CRLF included."""
        if self._sasl or self._buf[self._pos : self._pos + 5].upper() == b"AUTH ":
            return max(self.max_command_line, MAX_AUTH_LINE)
        verb = bytes(self._buf[self._pos : self._pos + 5]).upper()
        if verb == b"MAIL ":  # RFC 3461 §4: ENVID adds up to 100 characters
            return self.max_command_line + DSN_MAIL_EXTRA
        if verb == b"RCPT ":  # RFC 3461 §4: ORCPT adds up to 500, NOTIFY its words
            return self.max_command_line + DSN_RCPT_EXTRA
        return self.max_command_line

    def _next_command_event(self) -> Event | None:
        while True:
            end = self._buf.find(b"\n", max(self._pos, self._scan_from))
            if self._discarding:
                if end < 0:
                    self._clear_buffer()
                    return None
                self._pos = end + 1
                self._discarding = False
                continue
            if end < 0:
                # No line end yet: is what we have already too long?
                pending = len(self._buf) - self._pos
                if self._buf.endswith(b"\r"):
                    pending -= 1
                if pending > self._line_limit() - 2:
                    self._clear_buffer()
                    self._discarding = True
                    return self._line_too_long()
                self._scan_from = len(self._buf)
                return None
            stop = end - 1 if end > self._pos and self._buf[end - 1] == 0x0D else end
            too_long = stop - self._pos > self._line_limit() - 2
            line = bytes(self._buf[self._pos : stop])
            self._pos = end + 1
            if too_long:
                return self._line_too_long()
            if self._sasl:
                return AuthResponse(line.decode("utf-8", "replace"))
            event = self._parse_command(line)
            if event is None:  # a BDAT to refuse: its chunk is read first
                return self._next_chunk_event()
            return event

    def _line_too_long(self) -> Rejected:
        if self._sasl:
            # Whatever the session's exchange was, an unreadable line ends it.
            self._sasl = False
            return Rejected(Reply(500, "Line too long", "5.5.6"), "auth")
        return _reject(500, "Line too long", "5.5.6")

    # --- commands ---------------------------------------------------------------
    def _parse_command(self, raw: bytes) -> Event | None:
        verb_raw, _, arg_raw = raw.partition(b" ")
        verb = verb_raw.decode("ascii", "replace").upper()
        if verb not in _COMMANDS:
            if verb in _NOT_IMPLEMENTED:
                return _reject(502, f"{verb} not implemented", "5.5.1")
            if not raw.strip():
                return _reject(500, "Empty command", "5.5.2")
            return _reject(500, "Command not recognized", "5.5.1")
        try:
            arg = arg_raw.decode("utf-8")
        except UnicodeDecodeError:
            event: Event | None = _reject(501, "Invalid UTF-8 in command", "5.5.2")
        else:
            if arg.isprintable():
                event = _COMMANDS[verb](self, arg.strip(" "))
            else:
                event = _reject(501, "Control characters in arguments", "5.5.4")
        if isinstance(event, Rejected):
            return Rejected(event.reply, verb.lower())
        return event

    def _hello(self, arg: str, extended: bool) -> Event:
        if not _valid_hello_name(arg):
            verb = "EHLO" if extended else "HELO"
            return _reject(501, f"Syntax: {verb} hostname", "5.5.4")
        return Hello(arg, extended)

    def _ehlo(self, arg: str) -> Event:
        return self._hello(arg, True)

    def _helo(self, arg: str) -> Event:
        return self._hello(arg, False)

    def _mail(self, arg: str) -> Event:
        if not self._greeted:
            return _reject(503, "Send HELO/EHLO first", _SEQUENCE)
        if self._in_transaction:
            return _reject(503, "Nested MAIL command", _SEQUENCE)
        event = parse_mail(arg)
        if isinstance(event, MailFrom) and event.dsn.requiretls and not self.tls:
            # RFC 8689 §4.1: REQUIRETLS only over TLS (it is not offered without).
            return _reject(530, "REQUIRETLS needs a TLS session", "5.7.10")
        return event

    def _rcpt(self, arg: str) -> Event:
        if not self._in_transaction:
            return _reject(503, "Need MAIL before RCPT", _SEQUENCE)
        if self._bdat is not None:
            return _reject(503, "RCPT not allowed after BDAT", _SEQUENCE)
        return parse_rcpt(arg, utf8=self._smtputf8)

    def _data(self, arg: str) -> Event:
        if not self._in_transaction:
            return _reject(503, "Need MAIL command", _SEQUENCE)
        if self._bdat is not None:
            return _reject(503, "DATA not allowed after BDAT", _SEQUENCE)  # RFC 3030 §2
        if not self._recipients:
            return _reject(554, "No valid recipients", _SEQUENCE)
        if arg:
            return _reject(501, "DATA takes no arguments", "5.5.4")
        return DataRequested()

    def _bdat_command(self, arg: str) -> Event | None:
        """``BDAT chunk-size [LAST]`` (RFC 3030 §2); None: a refusal that
        comes out once the chunk has been read."""
        words = arg.split(" ")
        count = words[0]
        if (
            len(words) > 2
            or not (count.isascii() and count.isdigit())
            or len(count) > MAX_SIZE_DIGITS
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            # Without a count there is no telling where the next command
            # begins: reading the chunk as commands would run the client's
            # content, so the dialogue ends after this answer.
            self._hang_up = True
            return _reject(501, "Syntax: BDAT chunk-size [LAST]", "5.5.4")
        self._chunk = ChunkStart(int(count), len(words) == 2)
        self._chunk_left = self._chunk.size
        refusal = None
        if not self._in_transaction:
            refusal = _reject(503, "Need MAIL command", _SEQUENCE)
        elif not self._recipients:
            refusal = _reject(554, "No valid recipients", _SEQUENCE)
        if refusal is not None:
            self._chunk_refusal = Rejected(refusal.reply, "bdat")
            return None
        if self._bdat is None:
            self._bdat = DataDecoder(self.max_message_size, self.max_text_line, dot_stuffed=False)
        return self._chunk

    def _rset(self, arg: str) -> Event:
        if arg:
            return _reject(501, "RSET takes no arguments", "5.5.4")
        return Reset()

    def _noop(self, arg: str) -> Event:
        return Noop()  # RFC 5321 §4.1.1.9: any argument is ignored

    def _quit(self, arg: str) -> Event:
        return Quit()  # an argument is not allowed, but refusing to quit helps no one

    def _vrfy(self, arg: str) -> Event:
        if not arg:
            return _reject(501, "Syntax: VRFY address", "5.5.4")
        return Verify(arg)

    def _help(self, arg: str) -> Event:
        return Help(arg)

    def _starttls(self, arg: str) -> Event:
        if self.tls:
            return _reject(503, "TLS already active", _SEQUENCE)
        if arg:
            return _reject(501, "STARTTLS takes no arguments", "5.5.4")  # RFC 3207 §4
        return StartTls()

    def _auth(self, arg: str) -> Event:
        if self.authenticated:
            return _reject(503, "Already authenticated", _SEQUENCE)  # RFC 4954 §4
        if not self._greeted:
            return _reject(503, "Send EHLO first", _SEQUENCE)
        if self._in_transaction:
            return _reject(503, "AUTH not allowed during a mail transaction", _SEQUENCE)
        words = arg.split(" ")
        mechanism = words[0].upper()
        if not _MECHANISM.fullmatch(mechanism) or len(words) > 2:
            return _reject(501, "Syntax: AUTH mechanism [initial-response]", "5.5.2")
        return Auth(mechanism, words[1] if len(words) == 2 else None)

    # --- output ---------------------------------------------------------------
    def send(self, reply: Reply) -> bytes:
        """Answer the pending event with ``reply``; return the bytes to write.

        Transitions (anything not listed changes nothing):

        ========================  ======  =========================================
        event                     reply   effect
        ========================  ======  =========================================
        Hello                     2xx     greeted, transaction cleared
        MailFrom                  2xx     transaction open
        RcptTo                    2xx     one more recipient
        DataRequested             354     DATA mode: DataChunk ... DataComplete
        DataComplete              any     transaction cleared
        ChunkComplete             2xx     not last: the next BDAT continues it
        ChunkComplete             other   (or last) transaction cleared
        Rejected (bad BDAT)       any     closed: the chunk's end is unknown
        Reset                     2xx     transaction cleared
        StartTls                  220     buffer discarded, un-greeted, ``tls``
        Auth, AuthResponse        334     the next line is an AuthResponse
        Auth, AuthResponse        235     ``authenticated``; exchange over
        Auth, AuthResponse        other   exchange over
        Quit                      221     closed
        any                       421     closed (RFC 5321 §3.8)
        ========================  ======  =========================================
        """
        event = self._pending
        if event is None:
            raise LocalProtocolError("send() without an event to answer")
        self._pending = None
        code = reply.code
        ok = 200 <= code < 300
        match event:
            case Hello() if ok:
                self._greeted = True
                self.extended = event.extended
                self._clear_transaction()
            case MailFrom() if ok:
                self._in_transaction = True
                self._smtputf8 = event.smtputf8
                self._recipients = 0
            case RcptTo() if ok:
                self._recipients += 1
            case DataRequested() if code == 354:
                self._decoder = DataDecoder(self.max_message_size, self.max_text_line)
            case DataComplete():
                self._clear_transaction()
            case ChunkComplete() if not (ok and not event.last):
                self._clear_transaction()  # the message is in, or the transaction failed
            case Reset() if ok:
                self._clear_transaction()
            case StartTls() if code == 220:
                self.discarded_after_starttls += self.buffered
                self._clear_buffer()
                self._discarding = False
                self._greeted = False
                self.extended = False
                self.authenticated = False
                self._clear_transaction()
                self.tls = True
            case Auth() | AuthResponse():
                self._sasl = code == 334
                if code == 235:
                    self.authenticated = True
            case Quit() if code == 221:
                self._close()
        if code == 421 or self._hang_up:
            self._close()
        return reply.to_bytes()

    def close(self) -> None:
        """End the dialogue without a 421: the session has answered its last
        command (e.g. STARTTLS refused because data followed it)."""
        self._pending = None
        self._close()

    def send_unsolicited(self, reply: Reply) -> bytes:
        """Bytes for a reply that answers no command: the greeting, or a 421.

        Changes no state, except that 421 closes the dialogue (RFC 5321 §3.8).
        """
        if reply.code == 421:
            self._close()
        return reply.to_bytes()

    def _clear_transaction(self) -> None:
        self._in_transaction = False
        self._smtputf8 = False
        self._recipients = 0
        self._bdat = None

    def _close(self) -> None:
        self._closed = True
        self._chunk = None
        self._chunk_left = 0
        self._decoder = None
        self._data_complete = None
        self._data_in.clear()
        self._clear_buffer()

    def _clear_buffer(self) -> None:
        self._buf.clear()
        self._pos = 0
        self._scan_from = 0


_COMMANDS: dict[str, Callable[[SmtpServerCore, str], Event | None]] = {
    "EHLO": SmtpServerCore._ehlo,
    "HELO": SmtpServerCore._helo,
    "MAIL": SmtpServerCore._mail,
    "RCPT": SmtpServerCore._rcpt,
    "DATA": SmtpServerCore._data,
    "BDAT": SmtpServerCore._bdat_command,
    "RSET": SmtpServerCore._rset,
    "NOOP": SmtpServerCore._noop,
    "QUIT": SmtpServerCore._quit,
    "VRFY": SmtpServerCore._vrfy,
    "HELP": SmtpServerCore._help,
    "STARTTLS": SmtpServerCore._starttls,
    "AUTH": SmtpServerCore._auth,
}
