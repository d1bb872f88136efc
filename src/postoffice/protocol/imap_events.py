"""What the IMAP server core hands its session: one frozen dataclass per
command (RFC 9051 §6, with the extensions of issue #13), plus the values
they carry (sequence sets, search keys, fetch items).

Every command event has the client's ``tag``; the session answers it with
``ImapServerCore.tagged``.  Mailbox names are already decoded (modified
UTF-7 for rev1 clients, UTF-8 for rev2) and INBOX is upper-cased.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# --- values -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A sequence set (RFC 9051 §9 ``sequence-set``): ranges of numbers,
    ``None`` standing for ``*`` (the largest number in use); or ``$``, the
    saved search result (RFC 5182 / RFC 9051 §6.4.4.1), as ``saved``."""

    ranges: tuple[tuple[int | None, int | None], ...] = ()
    saved: bool = False

    def resolve(self, largest: int) -> Iterator[int]:
        """The numbers meant, in ascending order without repeats, given the
        largest in use (``*``); numbers above it are dropped.  ``$`` must be
        resolved by the session before."""
        if self.saved:
            raise ValueError("resolve the saved search result ($) first")
        seen: set[int] = set()
        for low, high in self.ranges:
            a = largest if low is None else low
            b = largest if high is None else high
            a, b = min(a, b), max(a, b)  # RFC 9051 §9: 4:2 is 2:4
            seen.update(range(a, min(b, largest) + 1))
        return iter(sorted(seen))

    def positions(self, ordered: Sequence[int]) -> list[int]:
        """The indexes, ascending, of the numbers of ``ordered`` (ascending,
        e.g. a folder's UIDs) this set names, ``*`` being the last of them;
        found by bisection, so ``1:*`` of 100,000 UIDs costs no test per UID."""
        if self.saved:
            raise ValueError("resolve the saved search result ($) first")
        if not ordered:
            return []
        largest = ordered[-1]
        spans = []
        for low, high in self.ranges:
            a = largest if low is None else low
            b = largest if high is None else high
            a, b = min(a, b), max(a, b)
            spans.append((bisect.bisect_left(ordered, a), bisect.bisect_right(ordered, b)))
        if len(spans) == 1:
            return list(range(*spans[0]))
        found: set[int] = set()
        for i, j in spans:
            found.update(range(i, j))
        return sorted(found)

    def contains(self, number: int, largest: int) -> bool:
        for low, high in self.ranges:
            a = largest if low is None else low
            b = largest if high is None else high
            if min(a, b) <= number <= max(a, b):
                return True
        return False

    def to_wire(self) -> str:
        if self.saved:
            return "$"

        def one(n: int | None) -> str:
            return "*" if n is None else str(n)

        return ",".join(
            one(low) if low == high else f"{one(low)}:{one(high)}" for low, high in self.ranges
        )


@dataclass(frozen=True, slots=True)
class SearchKey:
    """One search key (RFC 9051 §6.4.4), upper-case ``op`` and its arguments.

    ``op`` is the keyword (``FROM``, ``SINCE``, ``UID``, ``LARGER``, ...) or
    one of ``AND`` (a parenthesized list, and the whole criteria), ``OR``
    (two keys), ``NOT`` (one key), ``SEQ`` (a bare sequence set).  ``MODSEQ``
    (RFC 7162 §3.1.5) has ``(modseq,)`` or ``(entry, type, modseq)``.
    """

    op: str
    args: tuple[SearchArg, ...] = ()


SearchArg = str | int | dt.date | SequenceSet | SearchKey


@dataclass(frozen=True, slots=True)
class Section:
    """A body section (RFC 9051 §6.4.5): ``part`` (1.2.3 -> (1, 2, 3), empty
    for the whole message), ``text``: ``HEADER``, ``HEADER.FIELDS``,
    ``HEADER.FIELDS.NOT``, ``TEXT``, ``MIME`` or "", and ``fields`` for the
    two field lists (upper-cased)."""

    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()

    def to_wire(self) -> str:
        parts = [".".join(map(str, self.part))] if self.part else []
        if self.text:
            parts.append(self.text)
        spec = ".".join(parts)
        if self.fields:
            spec += " (" + " ".join(self.fields) + ")"
        return f"[{spec}]"


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One fetch attribute (RFC 9051 §6.4.5).  ``name``: ``FLAGS``,
    ``ENVELOPE``, ``INTERNALDATE``, ``RFC822.SIZE``, ``BODY``,
    ``BODYSTRUCTURE``, ``UID``, ``MODSEQ``, ``RFC822``, ``RFC822.HEADER``,
    ``RFC822.TEXT`` (rev1), ``BODY[]`` (``section`` set; ``peek`` for
    BODY.PEEK), ``BINARY[]``, ``BINARY.SIZE[]`` (RFC 3516).  ``partial``:
    ``<start.length>``."""

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    def to_wire(self) -> str:
        """The item as a client sends it (and, without ``.PEEK``, as the
        FETCH response names it, except ``partial`` there shows only the start)."""
        if self.section is None:
            return self.name
        name = self.name + (".PEEK" if self.peek else "")
        text = name + self.section.to_wire()
        if self.partial is not None:
            text += f"<{self.partial[0]}.{self.partial[1]}>"
        return text


# --- command events ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capability:
    tag: str


@dataclass(frozen=True, slots=True)
class Noop:
    tag: str


@dataclass(frozen=True, slots=True)
class Check:
    """CHECK (RFC 3501 §6.4.1; gone from rev2, answered like NOOP)."""

    tag: str


@dataclass(frozen=True, slots=True)
class Logout:
    tag: str


@dataclass(frozen=True, slots=True)
class StartTls:
    tag: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """AUTHENTICATE (RFC 9051 §6.2.2); ``initial`` as sent with SASL-IR
    (RFC 4959: ``=`` is an empty response), None when absent."""

    tag: str
    mechanism: str
    initial: str | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A client line answering a SASL challenge; ``*`` cancels (RFC 9051 §6.2.2)."""

    tag: str
    line: str


@dataclass(frozen=True, slots=True)
class Login:
    tag: str
    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Enable:
    """ENABLE (RFC 5161); capability names upper-cased."""

    tag: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QresyncParams:
    """SELECT's QRESYNC parameters (RFC 7162 §3.2.5)."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True, slots=True)
class Select:
    """SELECT, or EXAMINE (``readonly``), with RFC 7162 parameters."""

    tag: str
    mailbox: str
    readonly: bool = False
    condstore: bool = False
    qresync: QresyncParams | None = None


@dataclass(frozen=True, slots=True)
class Create:
    """CREATE, with CREATE-SPECIAL-USE's ``USE (...)`` (RFC 6154 §3)."""

    tag: str
    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delete:
    tag: str
    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename:
    tag: str
    mailbox: str
    new_name: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    tag: str
    mailbox: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    tag: str
    mailbox: str


@dataclass(frozen=True, slots=True)
class ListMailboxes:
    """LIST (RFC 9051 §6.3.9, LIST-EXTENDED RFC 5258, LIST-STATUS RFC 5819),
    or LSUB (``lsub``, rev1).  Options upper-cased; ``status_items`` are
    RETURN (STATUS (...))'s items."""

    tag: str
    reference: str
    patterns: tuple[str, ...]
    selection: tuple[str, ...] = ()
    return_options: tuple[str, ...] = ()
    status_items: tuple[str, ...] = ()
    lsub: bool = False


@dataclass(frozen=True, slots=True)
class Namespace:
    tag: str


@dataclass(frozen=True, slots=True)
class Status:
    tag: str
    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Append:
    """APPEND (RFC 9051 §6.3.12); ``binary`` for a ``~{n}`` literal8 (RFC 3516)."""

    tag: str
    mailbox: str
    flags: tuple[str, ...]
    internal_date: dt.datetime | None
    message: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Idle:
    """IDLE (RFC 2177): answer with ``continuation``; ``IdleDone`` follows."""

    tag: str


@dataclass(frozen=True, slots=True)
class IdleDone:
    """The client's DONE ending IDLE (RFC 2177 §3); answer with ``tagged``."""

    tag: str


@dataclass(frozen=True, slots=True)
class Close:
    tag: str


@dataclass(frozen=True, slots=True)
class Unselect:
    tag: str


@dataclass(frozen=True, slots=True)
class Expunge:
    """EXPUNGE, or UID EXPUNGE with its ``uids`` (RFC 4315 §2.1)."""

    tag: str
    uids: SequenceSet | None = None


@dataclass(frozen=True, slots=True)
class Search:
    """SEARCH / UID SEARCH; ``criteria`` is an ``AND`` of the keys;
    ``return_options``: ESEARCH's RETURN (...) (RFC 4731), None without it."""

    tag: str
    uid: bool
    criteria: SearchKey
    charset: str | None = None
    return_options: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Fetch:
    """FETCH / UID FETCH; macros expanded; CHANGEDSINCE / VANISHED (RFC 7162)."""

    tag: str
    uid: bool
    sequence: SequenceSet
    items: tuple[FetchItem, ...]
    changed_since: int | None = None
    vanished: bool = False


@dataclass(frozen=True, slots=True)
class Store:
    """STORE / UID STORE; ``mode`` "+", "-" or "" (replace)."""

    tag: str
    uid: bool
    sequence: SequenceSet
    mode: str
    silent: bool
    flags: tuple[str, ...]
    unchanged_since: int | None = None


@dataclass(frozen=True, slots=True)
class Copy:
    """COPY / UID COPY, or MOVE (``move``, RFC 6851)."""

    tag: str
    uid: bool
    sequence: SequenceSet
    mailbox: str
    move: bool = False


@dataclass(frozen=True, slots=True)
class Id:
    """ID (RFC 2971); ``params`` None for NIL."""

    tag: str
    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, slots=True)
class GetQuotaRoot:
    tag: str
    mailbox: str


@dataclass(frozen=True, slots=True)
class GetQuota:
    tag: str
    root: str


@dataclass(frozen=True, slots=True)
class Compress:
    """COMPRESS (RFC 4978); ``mechanism`` upper-cased (only DEFLATE exists)."""

    tag: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class LiteralExpected:
    """A synchronizing literal of ``size`` octets is announced (RFC 9051
    §4.3): answer ``continue_literal()`` to have it sent, or ``tagged`` NO
    to refuse the command."""

    tag: str
    size: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line the core refuses by itself.  ``tag`` None: answer untagged
    (no usable tag).  ``fatal``: the connection cannot go on (bytes would
    follow that we refuse to read); ``reply_rejected`` adds ``* BYE``."""

    tag: str | None
    text: str
    status: str = "BAD"
    code: str | None = None
    fatal: bool = False


Command = (
    Capability
    | Noop
    | Check
    | Logout
    | StartTls
    | Authenticate
    | Login
    | Enable
    | Select
    | Create
    | Delete
    | Rename
    | Subscribe
    | Unsubscribe
    | ListMailboxes
    | Namespace
    | Status
    | Append
    | Idle
    | Close
    | Unselect
    | Expunge
    | Search
    | Fetch
    | Store
    | Copy
    | Id
    | GetQuotaRoot
    | GetQuota
    | Compress
)

Event = Command | AuthResponse | IdleDone | LiteralExpected | Rejected
