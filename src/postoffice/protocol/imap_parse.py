"""The IMAP command grammar (RFC 9051 §9; RFC 3501 §9 where rev1 differs),
sans I/O: one whole command in, one event out.

The core (``imap.py``) frames a command: its lines and literals, joined as
they came on the wire (``{n}`` CRLF and then the n octets), with every
literal already within bounds.  ``parse_command`` reads that with a
recursive-descent ``Reader`` whose nesting (parentheses, NOT, OR) and
sequence-set ranges are bounded, so no input costs more than its length.

Written by hand: the Python IMAP libraries (imaplib, imapclient,
aioimaplib) are clients and parse responses; no maintained library parses
the client's side of the grammar.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from postoffice.mail import mutf7
from postoffice.protocol import imap_events as ev
from postoffice.protocol.imap_names import (
    normalize_mailbox,
    valid_utf8_name,
)

MAX_NUMBER: Final = 0xFFFFFFFF  # RFC 9051 §9: number is 32-bit unsigned
MAX_NUMBER64: Final = 0x7FFFFFFFFFFFFFFF  # number64, mod-sequence-value (RFC 7162 §7)

# RFC 9051 §9: atom-specials are ( ) { SP CTL % * " \ and ] (resp-specials).
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x20)) | {0x7F}
_ATOM_CHARS = frozenset(range(0x01, 0x80)) - _ATOM_SPECIALS
_ASTRING_CHARS = _ATOM_CHARS | {ord("]")}
_TAG_CHARS = _ASTRING_CHARS - {ord("+")}
_LIST_CHARS = _ATOM_CHARS | frozenset(b"%*]")
_NAME_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
_DIGITS = frozenset(b"0123456789")

_SYSTEM_FLAGS = {
    f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
}
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_STATUS_ITEMS = frozenset(
    {"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "RECENT"}
    | {"HIGHESTMODSEQ", "APPENDLIMIT"}  # RFC 7162 §3.1.9, RFC 7889 §3
)
_SEARCH_RETURN = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})  # RFC 4731, RFC 5182
_CHARSETS = frozenset({"UTF-8", "US-ASCII"})  # RFC 9051 §6.4.4: UTF-8 is required
BADCHARSET = "BADCHARSET"  # the core adds the list (UTF-8 US-ASCII)

_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_FETCH_SIMPLE = frozenset(
    {"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "BODY", "BODYSTRUCTURE", "UID"}
    | {"MODSEQ", "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
)
_SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})

# Search keys by what follows them (RFC 9051 §6.4.4, RFC 3501 §6.4.4).
_KEYS_BARE = frozenset(
    {"ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "SEEN", "UNANSWERED", "UNDELETED"}
    | {"UNDRAFT", "UNFLAGGED", "UNSEEN", "NEW", "OLD", "RECENT", "SAVEDBEFORE"}
)
_KEYS_STRING = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
_KEYS_DATE = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
_KEYS_NUMBER = frozenset({"LARGER", "SMALLER"})


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one command's structure (the core bounds its size)."""

    max_depth: int = 100  # parentheses, NOT and OR nested
    max_ranges: int = 10000  # ranges in one sequence set
    max_items: int = 10000  # list items, search keys, flags in one command


class ParseError(Exception):
    """Input the grammar refuses; ``text`` is safe to send, ``status``/``code``
    say how (BAD, or NO [BADCHARSET])."""

    def __init__(self, text: str, status: str = "BAD", code: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.code = code


class Reader:
    """A cursor over one framed command (see the module docstring)."""

    def __init__(self, data: bytes, *, utf8: bool, limits: Limits) -> None:
        self.data = data
        self.pos = 0
        self.utf8 = utf8  # rev2 / UTF8=ACCEPT: mailbox names are UTF-8
        self.limits = limits
        self._depth = 0
        self._items = 0

    # --- primitives -------------------------------------------------------------
    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def expect(self, token: bytes) -> None:
        end = self.pos + len(token)
        if self.data[self.pos : end].upper() != token:
            raise ParseError(f"Expected {token.decode()!r}")
        self.pos = end

    def accept(self, token: bytes) -> bool:
        end = self.pos + len(token)
        if self.data[self.pos : end].upper() == token:
            self.pos = end
            return True
        return False

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise ParseError("Expected a space")
        self.pos += 1

    def end(self) -> None:
        if not self.at_end():
            raise ParseError("Unexpected characters at the end of the command")

    def open(self) -> None:
        self.expect(b"(")
        self.nest()

    def close(self) -> None:
        self.expect(b")")
        self._depth -= 1

    def nest(self) -> None:
        self._depth += 1
        if self._depth > self.limits.max_depth:
            raise ParseError("Nested too deeply")

    def unnest(self) -> None:
        self._depth -= 1

    def count_item(self) -> None:
        self._items += 1
        if self._items > self.limits.max_items:
            raise ParseError("Too many items in one command")

    def _take(self, allowed: frozenset[int]) -> bytes:
        start = self.pos
        data = self.data
        while self.pos < len(data) and data[self.pos] in allowed:
            self.pos += 1
        return data[start : self.pos]

    # --- tokens ---------------------------------------------------------------------
    def tag(self) -> str:
        raw = self._take(_TAG_CHARS)
        if not raw:
            raise ParseError("Missing or invalid tag")
        return raw.decode("ascii")

    def atom(self) -> str:
        raw = self._take(_ATOM_CHARS)
        if not raw:
            raise ParseError("Expected an atom")
        return raw.decode("ascii")

    def keyword(self) -> str:
        return self.atom().upper()

    def name(self) -> str:
        """Letters, digits, dots: a fetch attribute or section name."""
        return self._take(_NAME_CHARS).decode("ascii").upper()

    def number(self, limit: int = MAX_NUMBER, *, nonzero: bool = False) -> int:
        raw = self._take(_DIGITS)
        if not raw:
            raise ParseError("Expected a number")
        if len(raw) > 19 or int(raw) > limit:
            raise ParseError("Number out of range")
        if nonzero and (raw[0] == 0x30):
            raise ParseError("Expected a non-zero number")
        return int(raw)

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise ParseError("Unterminated quoted string")
            c = data[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:  # RFC 9051 §9: only \" and \\ are escapes
                if self.pos >= len(data) or data[self.pos] not in b'"\\':
                    raise ParseError("Bad escape in quoted string")
                c = data[self.pos]
                self.pos += 1
            elif c in (0x00, 0x0A, 0x0D):
                raise ParseError("Bad character in quoted string")
            out.append(c)

    def literal(self, *, allow8: bool = False) -> tuple[bytes, bool]:
        """A literal ``{n}``, ``{n+}``, ``{n-}`` (or ``~{n}`` when ``allow8``):
        its octets and whether it was a literal8."""
        binary = self.accept(b"~")
        if binary and not allow8:
            raise ParseError("literal8 not allowed here")
        self.expect(b"{")
        size = self.number(MAX_NUMBER64)
        if self.peek() in (0x2B, 0x2D):
            self.pos += 1
        self.expect(b"}\r\n")
        end = self.pos + size
        if end > len(self.data):
            raise ParseError("Truncated literal")  # the core frames: cannot happen
        raw = self.data[self.pos : end]
        self.pos = end
        if not binary and 0 in raw:
            # RFC 9051 §4.3: a literal holds no NUL (literal8 may).
            raise ParseError("NUL in literal; use literal8", code="UNKNOWN-CTE")
        return raw, binary

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c in (0x7B, 0x7E):
            return self.literal()[0]
        raise ParseError("Expected a string")

    def astring_bytes(self) -> bytes:
        if self.peek() in (0x22, 0x7B):
            return self.string()
        raw = self._take(_ASTRING_CHARS)
        if not raw:
            raise ParseError("Expected a string or atom")
        return raw

    def astring(self) -> str:
        return _utf8(self.astring_bytes())

    def nstring(self) -> str | None:
        if self.accept(b"NIL"):
            return None
        return _utf8(self.string())

    def mailbox(self) -> str:
        return normalize_mailbox(self._mailbox_name(self.astring_bytes()))

    def list_mailbox(self) -> str:
        if self.peek() in (0x22, 0x7B):
            raw = self.string()
        else:
            raw = self._take(_LIST_CHARS)
            if not raw:
                raise ParseError("Expected a mailbox pattern")
        return self._mailbox_name(raw)

    def _mailbox_name(self, raw: bytes) -> str:
        text = _utf8(raw)
        if not self.utf8 and text.isascii():
            try:
                text = mutf7.decode(text)
            except mutf7.Mutf7Error as exc:
                raise ParseError(str(exc)) from exc
        if not valid_utf8_name(text):
            raise ParseError("Control characters in mailbox name")
        return text

    def sequence_set(self) -> ev.SequenceSet:
        if self.accept(b"$"):
            return ev.SequenceSet(saved=True)
        ranges: list[tuple[int | None, int | None]] = []
        while True:
            low = self._seq_number()
            high = self._seq_number() if self.accept(b":") else low
            ranges.append((low, high))
            if len(ranges) > self.limits.max_ranges:
                raise ParseError("Too many ranges in sequence set")
            if not self.accept(b","):
                return ev.SequenceSet(tuple(ranges))

    def _seq_number(self) -> int | None:
        if self.accept(b"*"):
            return None
        return self.number(nonzero=True)

    def flag(self) -> str:
        if self.accept(b"\\"):
            text = "\\" + self.atom()
            return _SYSTEM_FLAGS.get(text.upper(), text)
        return self.atom()

    def flag_list(self) -> tuple[str, ...]:
        self.open()
        flags: list[str] = []
        while not self.accept(b")"):
            if flags:
                self.sp()
            flags.append(self.flag())
            self.count_item()
        self.unnest()
        return tuple(flags)

    def atom_list(self) -> tuple[str, ...]:
        """``( atom *(SP atom) )``, possibly empty, upper-cased."""
        self.open()
        items: list[str] = []
        while not self.accept(b")"):
            if items:
                self.sp()
            items.append(self.flag().upper())
            self.count_item()
        self.unnest()
        return tuple(items)

    def date(self) -> dt.date:
        quoted = self.accept(b'"')
        day = self.number(31)
        self.expect(b"-")
        month = self._month()
        self.expect(b"-")
        year = self._digits(4)
        if quoted:
            self.expect(b'"')
        try:
            return dt.date(year, month, day)
        except ValueError as exc:
            raise ParseError("Invalid date") from exc

    def date_time(self) -> dt.datetime:
        """RFC 9051 §9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz"."""
        self.expect(b'"')
        day = self._digits(1) if self.accept(b" ") else self._digits(2)
        self.expect(b"-")
        month = self._month()
        self.expect(b"-")
        year = self._digits(4)
        self.sp()
        hour = self._digits(2)
        self.expect(b":")
        minute = self._digits(2)
        self.expect(b":")
        second = self._digits(2)
        self.sp()
        sign = self.peek()
        if sign not in (0x2B, 0x2D):
            raise ParseError("Expected a time zone")
        self.pos += 1
        zone = self._digits(4)
        self.expect(b'"')
        offset = dt.timedelta(hours=zone // 100, minutes=zone % 100)
        if zone % 100 >= 60 or zone // 100 > 23:
            raise ParseError("Invalid time zone")
        try:
            tz = dt.timezone(-offset if sign == 0x2D else offset)
            return dt.datetime(year, month, day, hour, minute, second, tzinfo=tz)
        except ValueError as exc:
            raise ParseError("Invalid date-time") from exc

    def _digits(self, count: int) -> int:
        raw = self.data[self.pos : self.pos + count]
        if len(raw) != count or not all(c in _DIGITS for c in raw):
            raise ParseError("Expected digits")
        self.pos += count
        return int(raw)

    def _month(self) -> int:
        raw = self.data[self.pos : self.pos + 3].upper()
        try:
            month = _MONTHS.index(raw.decode("ascii", "replace")) + 1
        except ValueError as exc:
            raise ParseError("Invalid month") from exc
        self.pos += 3
        return month


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError("Invalid UTF-8") from exc


# --- commands ---------------------------------------------------------------------


def parse_tag(line: bytes) -> str | None:
    """The tag of a (possibly broken) command line, or None if it has none
    usable for a tagged reply."""
    r = Reader(line, utf8=True, limits=Limits())
    try:
        tag = r.tag()
        r.sp()
    except ParseError:
        return None
    return tag


def parse_command(data: bytes, *, utf8: bool, limits: Limits = Limits()) -> ev.Command:
    """One framed command -> its event; ParseError for anything malformed
    (the caller answers with the tag from ``parse_tag``)."""
    r = Reader(data, utf8=utf8, limits=limits)
    tag = r.tag()
    r.sp()
    name = r.keyword()
    uid = False
    if name == "UID":
        r.sp()
        uid = True
        name = r.keyword()
        if name not in _UID_COMMANDS:
            raise ParseError(f"UID {name} is not a command")
    parser = _COMMANDS.get(name)
    if parser is None:
        raise ParseError("Unknown command")
    event = parser(r, tag, name, uid)
    r.end()
    return event


def command_name(data: bytes) -> str:
    """The command word after the tag, upper-cased ("UID FETCH" as "FETCH"),
    or "" (for the core's state check before a full parse)."""
    r = Reader(data, utf8=True, limits=Limits())
    try:
        r.tag()
        r.sp()
        name = r.keyword()
        if name == "UID":
            r.sp()
            name = r.keyword()
    except ParseError:
        return ""
    return name


def _bare(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    if uid and name == "EXPUNGE":
        r.sp()
        return ev.Expunge(tag, r.sequence_set())
    simple: dict[str, ev.Command] = {
        "CAPABILITY": ev.Capability(tag), "NOOP": ev.Noop(tag), "CHECK": ev.Check(tag),
        "LOGOUT": ev.Logout(tag), "STARTTLS": ev.StartTls(tag), "NAMESPACE": ev.Namespace(tag),
        "IDLE": ev.Idle(tag), "CLOSE": ev.Close(tag), "UNSELECT": ev.Unselect(tag),
        "EXPUNGE": ev.Expunge(tag),
    }  # fmt: skip
    return simple[name]


def _authenticate(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    mechanism = r.keyword()
    initial = None
    if r.accept(b" "):
        # RFC 4959: base64 or "=" for an empty initial response.
        raw = r._take(
            frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
        )
        if not raw:
            raise ParseError("Bad initial response")
        initial = raw.decode("ascii")
    return ev.Authenticate(tag, mechanism, initial)


def _login(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    user = r.astring()
    r.sp()
    return ev.Login(tag, user, r.astring())


def _enable(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    caps: list[str] = []
    while r.accept(b" "):
        caps.append(r.keyword())
        r.count_item()
    if not caps:
        raise ParseError("ENABLE needs a capability")
    return ev.Enable(tag, tuple(caps))


def _select(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    mailbox = r.mailbox()
    condstore = False
    qresync: ev.QresyncParams | None = None
    if r.accept(b" "):
        r.open()
        first = True
        while not r.accept(b")"):
            if not first:
                r.sp()
            first = False
            param = r.keyword()
            if param == "CONDSTORE":
                condstore = True
            elif param == "QRESYNC":
                r.sp()
                qresync = _qresync(r)
            else:
                raise ParseError(f"Unknown SELECT parameter {param}")
        r.unnest()
    return ev.Select(tag, mailbox, name == "EXAMINE", condstore, qresync)


def _qresync(r: Reader) -> ev.QresyncParams:
    # RFC 7162 §3.2.5: (uidvalidity modseq [known-uids] [(seqs uids)])
    r.open()
    uidvalidity = r.number(nonzero=True)
    r.sp()
    modseq = r.number(MAX_NUMBER64, nonzero=True)
    known: ev.SequenceSet | None = None
    match: tuple[ev.SequenceSet, ev.SequenceSet] | None = None
    if r.accept(b" "):
        if r.peek() != 0x28:
            known = r.sequence_set()
            if not r.accept(b" "):
                r.close()
                return ev.QresyncParams(uidvalidity, modseq, known)
        r.open()
        seqs = r.sequence_set()
        r.sp()
        match = (seqs, r.sequence_set())
        r.close()
    r.close()
    return ev.QresyncParams(uidvalidity, modseq, known, match)


def _create(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    mailbox = r.mailbox()
    use: tuple[str, ...] = ()
    if r.accept(b" "):
        r.open()
        r.expect(b"USE")  # RFC 6154 §3: the one create-param defined
        r.sp()
        use = tuple(_SPECIAL_USE.get(f.upper(), f) for f in r.flag_list())
        r.close()
    return ev.Create(tag, mailbox, use)


_SPECIAL_USE = {
    f.upper(): f
    for f in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
}


def _one_mailbox(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    mailbox = r.mailbox()
    if name == "RENAME":
        r.sp()
        return ev.Rename(tag, mailbox, r.mailbox())
    single: dict[str, type[ev.Delete | ev.Subscribe | ev.Unsubscribe | ev.GetQuotaRoot]] = {
        "DELETE": ev.Delete, "SUBSCRIBE": ev.Subscribe, "UNSUBSCRIBE": ev.Unsubscribe,
        "GETQUOTAROOT": ev.GetQuotaRoot,
    }  # fmt: skip
    return single[name](tag, mailbox)


def _list(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    selection: tuple[str, ...] = ()
    if name == "LIST" and r.peek() == 0x28:
        selection = r.atom_list()  # RFC 5258 §3: (SUBSCRIBED REMOTE RECURSIVEMATCH ...)
        r.sp()
    reference = r._mailbox_name(r.astring_bytes())
    r.sp()
    patterns: list[str] = []
    if name == "LIST" and r.peek() == 0x28:
        r.open()
        while True:
            patterns.append(r.list_mailbox())
            r.count_item()
            if r.accept(b")"):
                break
            r.sp()
        r.unnest()
    else:
        patterns.append(r.list_mailbox())
    options: list[str] = []
    status: tuple[str, ...] = ()
    if name == "LIST" and r.accept(b" "):
        r.expect(b"RETURN")
        r.sp()
        r.open()
        while not r.accept(b")"):
            if options:
                r.sp()
            option = r.keyword()
            if option == "STATUS":  # RFC 5819 §2
                r.sp()
                status = _status_items(r)
            options.append(option)
            r.count_item()
        r.unnest()
    return ev.ListMailboxes(
        tag, reference, tuple(patterns), selection, tuple(options), status, name == "LSUB"
    )


def _status_items(r: Reader) -> tuple[str, ...]:
    items = r.atom_list()
    if not items or any(i not in _STATUS_ITEMS for i in items):
        raise ParseError("Invalid status item")
    return items


def _status(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    return ev.Status(tag, mailbox, _status_items(r))


def _append(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    flags: tuple[str, ...] = ()
    when: dt.datetime | None = None
    if r.peek() == 0x28:
        flags = r.flag_list()
        r.sp()
    if r.peek() == 0x22:
        when = r.date_time()
        r.sp()
    message, binary = r.literal(allow8=True)
    return ev.Append(tag, mailbox, flags, when, message, binary)


def _search(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    returns: tuple[str, ...] | None = None
    if r.accept(b"RETURN "):
        returns = r.atom_list()
        if any(o not in _SEARCH_RETURN for o in returns):
            raise ParseError("Unknown RETURN option")
        r.sp()
    charset = None
    if r.accept(b"CHARSET "):
        charset = r.astring().upper()
        r.sp()
        if charset not in _CHARSETS:
            raise ParseError("Unsupported charset", "NO", BADCHARSET)
    keys = [_search_key(r)]
    while r.accept(b" "):
        keys.append(_search_key(r))
    return ev.Search(tag, uid, ev.SearchKey("AND", tuple(keys)), charset, returns)


def _search_key(r: Reader) -> ev.SearchKey:
    r.count_item()
    c = r.peek()
    if c == 0x28:
        r.open()
        keys = [_search_key(r)]
        while r.accept(b" "):
            keys.append(_search_key(r))
        r.close()
        return ev.SearchKey("AND", tuple(keys))
    if c in _DIGITS or c in (0x2A, 0x24):  # digit, "*", "$"
        return ev.SearchKey("SEQ", (r.sequence_set(),))
    op = r.keyword()
    if op in _KEYS_BARE:
        return ev.SearchKey(op)
    r.sp()
    if op in _KEYS_STRING:
        return ev.SearchKey(op, (r.astring(),))
    if op in _KEYS_DATE:
        return ev.SearchKey(op, (r.date(),))
    if op in _KEYS_NUMBER:
        return ev.SearchKey(op, (r.number(MAX_NUMBER64),))
    if op in ("KEYWORD", "UNKEYWORD"):
        return ev.SearchKey(op, (r.atom(),))
    if op == "HEADER":
        field = r.astring()
        r.sp()
        return ev.SearchKey(op, (field, r.astring()))
    if op == "UID":
        return ev.SearchKey(op, (r.sequence_set(),))
    if op == "MODSEQ":  # RFC 7162 §3.1.5
        if r.peek() == 0x22:
            entry = r.astring()
            r.sp()
            kind = r.keyword()
            if kind not in ("PRIV", "SHARED", "ALL"):
                raise ParseError("Invalid MODSEQ entry type")
            r.sp()
            return ev.SearchKey(op, (entry, kind, r.number(MAX_NUMBER64)))
        return ev.SearchKey(op, (r.number(MAX_NUMBER64),))
    if op in ("NOT", "OR"):
        r.nest()
        first = _search_key(r)
        if op == "NOT":
            r.unnest()
            return ev.SearchKey(op, (first,))
        r.sp()
        second = _search_key(r)
        r.unnest()
        return ev.SearchKey(op, (first, second))
    raise ParseError(f"Unknown search key {op}")


def _fetch(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    sequence = r.sequence_set()
    r.sp()
    items: list[ev.FetchItem] = []
    if r.peek() == 0x28:
        r.open()
        while True:
            items.append(_fetch_item(r))
            r.count_item()
            if r.accept(b")"):
                break
            r.sp()
        r.unnest()
    else:
        start = r.pos
        macro = r.name()
        if macro in _FETCH_MACROS and r.peek() in (-1, 0x20):
            items.extend(ev.FetchItem(n) for n in _FETCH_MACROS[macro])
        else:
            r.pos = start
            items.append(_fetch_item(r))
    if uid and not any(i.name == "UID" for i in items):
        items.append(ev.FetchItem("UID"))  # RFC 9051 §6.4.9: UID FETCH always returns UID
    changed: int | None = None
    vanished = False
    if r.accept(b" "):
        r.open()
        first = True
        while not r.accept(b")"):
            if not first:
                r.sp()
            first = False
            modifier = r.keyword()
            if modifier == "CHANGEDSINCE":
                r.sp()
                changed = r.number(MAX_NUMBER64)
            elif modifier == "VANISHED" and uid:  # RFC 7162 §3.2.6: UID FETCH only
                vanished = True
            else:
                raise ParseError(f"Unknown FETCH modifier {modifier}")
        r.unnest()
        if vanished and changed is None:
            raise ParseError("VANISHED needs CHANGEDSINCE")
    return ev.Fetch(tag, uid, sequence, tuple(items), changed, vanished)


def _fetch_item(r: Reader) -> ev.FetchItem:
    name = r.name()
    if r.peek() != 0x5B:  # "["
        if name in _FETCH_SIMPLE:
            return ev.FetchItem(name)
        raise ParseError(f"Unknown fetch attribute {name or '?'}")
    peek = name.endswith(".PEEK")
    base = name.removesuffix(".PEEK")
    if base == "BODY":
        section = _section(r)
    elif base == "BINARY" or name == "BINARY.SIZE":  # RFC 3516 §4.2
        section = _section(r, binary=True)
        base = name if name == "BINARY.SIZE" else base
    else:
        raise ParseError(f"Unknown fetch attribute {name}")
    partial = None
    if name != "BINARY.SIZE" and r.accept(b"<"):
        start = r.number(MAX_NUMBER64)
        r.expect(b".")
        partial = (start, r.number(MAX_NUMBER64, nonzero=True))
        r.expect(b">")
    return ev.FetchItem(base, section, partial, peek)


def _section(r: Reader, *, binary: bool = False) -> ev.Section:
    r.expect(b"[")
    spec = r.name()
    words = spec.split(".") if spec else []
    part: list[int] = []
    while words and words[0].isdigit():
        if words[0].startswith("0") or len(words[0]) > 9:
            raise ParseError("Invalid section part")
        part.append(int(words.pop(0)))
    text = ".".join(words)
    fields: tuple[str, ...] = ()
    if text and (binary or text not in _SECTION_TEXTS or (text == "MIME" and not part)):
        raise ParseError("Invalid section")
    if text.startswith("HEADER.FIELDS"):
        r.sp()
        r.open()
        names: list[str] = []
        while True:
            names.append(r.astring().upper())
            r.count_item()
            if r.accept(b")"):
                break
            r.sp()
        r.unnest()
        fields = tuple(names)
    r.expect(b"]")
    return ev.Section(tuple(part), text, fields)


def _store(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    sequence = r.sequence_set()
    r.sp()
    unchanged: int | None = None
    if r.peek() == 0x28:  # RFC 7162 §3.1.3
        r.open()
        r.expect(b"UNCHANGEDSINCE ")
        unchanged = r.number(MAX_NUMBER64)
        r.close()
        r.sp()
    mode = ""
    if r.peek() in (0x2B, 0x2D):
        mode = chr(r.peek())
        r.pos += 1
    r.expect(b"FLAGS")
    silent = r.accept(b".SILENT")
    r.sp()
    if r.peek() == 0x28:
        flags = r.flag_list()
    else:
        found = [r.flag()]
        while r.accept(b" "):
            found.append(r.flag())
            r.count_item()
        flags = tuple(found)
    return ev.Store(tag, uid, sequence, mode, silent, flags, unchanged)


def _copy(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    sequence = r.sequence_set()
    r.sp()
    return ev.Copy(tag, uid, sequence, r.mailbox(), name == "MOVE")


def _id(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    if r.accept(b"NIL"):
        return ev.Id(tag, None)
    r.open()
    params: list[tuple[str, str | None]] = []
    while not r.accept(b")"):
        if params:
            r.sp()
        key = _utf8(r.string())
        r.sp()
        params.append((key, r.nstring()))
        if len(params) > 30:  # RFC 2971 §3.3: at most 30 field-value pairs
            raise ParseError("Too many ID fields")
    r.unnest()
    return ev.Id(tag, tuple(params))


def _getquota(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    return ev.GetQuota(tag, r.astring())


def _compress(r: Reader, tag: str, name: str, uid: bool) -> ev.Command:
    r.sp()
    return ev.Compress(tag, r.keyword())


_BARE: tuple[str, ...] = ("CAPABILITY", "NOOP", "CHECK", "LOGOUT", "STARTTLS", "NAMESPACE")
_BARE += ("IDLE", "CLOSE", "UNSELECT", "EXPUNGE")
_COMMANDS = {
    **dict.fromkeys(
        _BARE,
        _bare,
    ),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "ENABLE": _enable,
    "SELECT": _select,
    "EXAMINE": _select,
    "CREATE": _create,
    **dict.fromkeys(("DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "RENAME", "GETQUOTAROOT"), _one_mailbox),
    "LIST": _list,
    "LSUB": _list,
    "STATUS": _status,
    "APPEND": _append,
    "SEARCH": _search,
    "FETCH": _fetch,
    "STORE": _store,
    "COPY": _copy,
    "MOVE": _copy,
    "ID": _id,
    "GETQUOTA": _getquota,
    "COMPRESS": _compress,
}
_UID_COMMANDS = frozenset({"COPY", "MOVE", "FETCH", "SEARCH", "STORE", "EXPUNGE"})
KNOWN_COMMANDS = frozenset(_COMMANDS)
