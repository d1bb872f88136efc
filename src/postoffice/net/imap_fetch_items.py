"""FETCH data items and SEARCH keys answered from a message and its record.

Pure functions, no I/O: the IMAP session reads the file and parses it into
a ``protocol.imap_fetch.FetchMessage`` (in its executor), and these turn it
and the index record into the values of one FETCH response (RFC 9051
§6.4.5, §7.5.2), or decide whether it matches SEARCH criteria (§6.4.4).
Sections, partials, ENVELOPE, BODYSTRUCTURE and the CRLF form are all the
FetchMessage's: one home for message structure.

ENVELOPE, BODYSTRUCTURE, BODY and RFC822.SIZE are also kept, encoded, in
the index's structure cache (``Structure``, built here by
``structure_of``): a FETCH of those from a message seen before reads no
file, as Dovecot answers them from its ``dovecot.index.cache``.
"""

from __future__ import annotations

import datetime as dt
import email.errors
import email.header
import functools
import re
import time
from collections.abc import Callable

from postoffice.protocol.imap_events import FetchItem, SearchKey, Section, SequenceSet
from postoffice.protocol.imap_fetch import (
    FetchMessage,
    UnknownTransferEncoding,
    partial,
    response_name,
)
from postoffice.protocol.imap_response import Atom, Value, encode_value
from postoffice.storage.imap_index import MessageRecord, Structure

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

# Items answered from the index alone; everything else needs the file.
_FROM_RECORD = frozenset({"FLAGS", "UID", "INTERNALDATE", "MODSEQ"})
# Items the structure cache answers (BODY only without a section).
_STRUCTURAL = frozenset({"ENVELOPE", "BODYSTRUCTURE", "BODY", "RFC822.SIZE"})
# Names built once: an Atom checks its text when made.
_W_SIZE = re.compile(r",W=(\d+)")
_HEADER = Section(text="HEADER")
# The flag only a rev1 session shows, for the messages it holds as recent.
RECENT = frozenset({"\\Recent"})
_TEXT = Section(text="TEXT")


def wire_size(record: MessageRecord) -> int | None:
    """RFC822.SIZE from the ``W=`` in the file name (the CRLF size, as
    Dovecot writes it), if it has one."""
    if ",W=" not in record.stem:
        return None
    match = _W_SIZE.search(record.stem)
    return int(match.group(1)) if match else None


def structural(items: tuple[FetchItem, ...]) -> bool:
    """Whether an item of ``items`` is one the structure cache answers."""
    return any(i.name in _STRUCTURAL and i.section is None for i in items)


def needs_body(
    items: tuple[FetchItem, ...], record: MessageRecord, structure: Structure | None = None
) -> bool:
    """Whether answering ``items`` needs the message's file (given its
    cached ``structure``, if it has one)."""
    for item in items:
        if item.name in _FROM_RECORD:
            continue
        if item.name == "RFC822.SIZE" and wire_size(record) is not None:
            continue
        if structure is not None and item.name in _STRUCTURAL and item.section is None:
            continue
        return True
    return False


def structure_of(uid: int, message: FetchMessage) -> Structure:
    """What the structure cache keeps of ``message``, encoded for every mode
    (``utf8=False``: 8-bit text goes as literals, valid in rev1 and rev2)."""
    return Structure(
        uid=uid,
        wire_size=message.size,
        envelope=encode_value(list(message.envelope()), utf8=False),
        bodystructure=encode_value(list(message.bodystructure(True)), utf8=False),
        body=encode_value(list(message.bodystructure(False)), utf8=False),
    )


@functools.lru_cache(maxsize=1024)
def _flags_wire(flags: frozenset[str]) -> bytes:
    """FLAGS' list, encoded once per distinct set (a folder has few)."""
    return encode_value([Atom(f) for f in sorted(flags)], utf8=False)


@functools.lru_cache(maxsize=4096)
def _internaldate_wire(seconds: int) -> bytes:
    """``INTERNALDATE "..."``; messages delivered in one second share it."""
    return b'INTERNALDATE "%s"' % internaldate_text(seconds).encode("ascii")


def internaldate_text(seconds: int) -> str:
    """RFC 9051 §9 date-time, in UTC: ``"17-Jul-1996 02:44:25 +0000"``."""
    t = time.gmtime(seconds)  # a tenth of datetime's cost, FETCH calls it per message
    return (
        f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d}"
        f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def fetch_response(
    seq: int,
    items: tuple[FetchItem, ...],
    record: MessageRecord,
    message: FetchMessage | None,
    structure: Structure | None = None,
    *,
    utf8: bool,
    recent: bool = False,
) -> list[bytes]:
    """One whole ``* seq FETCH (name value ...)`` response (RFC 9051 §7.5.2),
    as the chunks to write in order: a section's octets (BODY[], RFC822,
    BINARY[]) are a chunk of their own, never copied into a larger string
    (``BODY.PEEK[]`` of 10,000 messages moves 100 MB).  ``message`` is None
    when no item needs it; ``structure`` answers the items it keeps;
    ``recent``: FLAGS shows \\Recent (rev1).  The items every client asks of
    every message are written straight as bytes (a FETCH of 10,000 messages
    does it 10,000 times); the rest go through ``encode_value``."""
    chunks: list[bytes] = []
    text: list[bytes] = []  # the tokens since the last literal's octets
    add = text.append
    for item in items:
        name = item.name
        if name == "UID":
            add(b"UID %d" % record.uid)
        elif name == "FLAGS":
            add(b"FLAGS " + _flags_wire(record.flags | RECENT if recent else record.flags))
        elif name == "INTERNALDATE":
            add(_internaldate_wire(record.internaldate))
        elif name == "MODSEQ":
            add(b"MODSEQ (%d)" % record.modseq)
        elif name == "RFC822.SIZE":
            size = wire_size(record)
            if size is None and structure is not None:
                size = structure.wire_size
            if size is None:
                size = message.size if message is not None else 0
            add(b"RFC822.SIZE %d" % size)
        elif structure is not None and name == "ENVELOPE":
            add(b"ENVELOPE " + structure.envelope)
        elif structure is not None and name == "BODYSTRUCTURE":
            add(b"BODYSTRUCTURE " + structure.bodystructure)
        elif structure is not None and name == "BODY" and item.section is None:
            add(b"BODY " + structure.body)
        elif message is not None:
            pair = _message_item(item, message)
            if pair is None:
                continue
            label, value = pair
            if isinstance(value, bytes):  # a literal (RFC 9051 §4.3): its octets apart
                add(b"%s {%d}\r\n" % (label, len(value)))
                head = b" ".join(text)
                chunks.append(head if chunks else b"* %d FETCH (%s" % (seq, head))
                chunks.append(value)
                text = [b""]  # the next token starts with its space
                add = text.append
            else:
                add(label + b" " + encode_value(value, utf8=utf8))
    if chunks:
        chunks.append(b" ".join(text) + b")\r\n")
        return chunks
    return [b"* %d FETCH (%s)\r\n" % (seq, b" ".join(text))]


@functools.lru_cache(maxsize=256)
def _label(item: FetchItem) -> bytes:
    """The item's name as the response shows it, encoded once per distinct
    item (a FETCH asks the same few of every message)."""
    return encode_value(response_name(item), utf8=True)


def _message_item(item: FetchItem, message: FetchMessage) -> tuple[bytes, Value] | None:
    """(name, value) of an item answered from the message's text; None when
    it has no answer (BINARY of an unknown encoding: the session answers NO
    [UNKNOWN-CTE], RFC 3516 §4.3)."""
    name = item.name
    section = item.section
    if name == "BODY" and section is not None:
        return _label(item), partial(message.section(section), item.partial)
    if name == "RFC822":
        return b"RFC822", message.wire
    if name == "RFC822.HEADER":
        return b"RFC822.HEADER", message.section(_HEADER)
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT", message.section(_TEXT)
    if name == "ENVELOPE":
        return b"ENVELOPE", list(message.envelope())
    if name in ("BODYSTRUCTURE", "BODY") and section is None:
        return name.encode("ascii"), list(message.bodystructure(name == "BODYSTRUCTURE"))
    if name in ("BINARY", "BINARY.SIZE") and section is not None:
        try:
            data = message.binary(section.part)
        except UnknownTransferEncoding:
            return None
        if name == "BINARY":
            return _label(item), partial(data, item.partial)
        return _label(item), len(data)
    return None


def retrieves(items: tuple[FetchItem, ...]) -> bool:
    """Whether FETCH of ``items`` downloads whole messages (RFC822, BODY[],
    BODY.PEEK[], BINARY[], no partial): what the mail log calls retrieved."""
    return any(
        i.name == "RFC822"
        or (
            i.name in ("BODY", "BINARY")
            and i.section is not None
            and not i.section.part
            and not i.section.text
            and i.partial is None
        )
        for i in items
    )


def sets_seen(items: tuple[FetchItem, ...]) -> bool:
    """Whether FETCH of ``items`` sets \\Seen (RFC 9051 §6.4.5: BODY[...]
    without .PEEK, RFC822, RFC822.TEXT, BINARY[...])."""
    return any(
        (i.name in ("BODY", "BINARY") and i.section is not None and not i.peek)
        or i.name in ("RFC822", "RFC822.TEXT")
        for i in items
    )


# --- SEARCH ---------------------------------------------------------------------------

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True),
    "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True),
    "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True),
    "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True),
    "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT"})
_BODY_KEYS = frozenset({"BODY", "TEXT", "HEADER", *_HEADER_KEYS})
_SENT_KEYS = frozenset({"SENTBEFORE", "SENTON", "SENTSINCE"})
# A message without a parsable Date: is dated the Unix epoch for SENT*, as
# Dovecot does (its sent date is 0 then): SENTBEFORE finds it, SENTSINCE
# does not (tests/interop/test_dovecot_reference.py compares).
_NO_SENT_DATE = dt.date(1970, 1, 1)


def decoded_field(body: bytes) -> str:
    """A header field body as text, its RFC 2047 encoded words decoded
    (undecodable ones, or unknown charsets, are left as written)."""
    text = body.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return text


def search_needs_body(key: SearchKey) -> bool:
    if key.op in _BODY_KEYS or key.op in _SENT_KEYS:
        return True
    return any(isinstance(a, SearchKey) and search_needs_body(a) for a in key.args)


def search_matches(
    key: SearchKey,
    record: MessageRecord,
    seq: int,
    largest_seq: int,
    largest_uid: int,
    message: Callable[[], FetchMessage],
    recent: bool = False,
) -> bool:
    """Whether the message (``seq``, ``record``; ``message`` gives it parsed
    when a key needs its text; ``recent``: the session holds it as \\Recent)
    matches ``key`` (RFC 9051 §6.4.4, RFC 3501 §6.4.4 for rev1's RECENT,
    NEW and OLD)."""

    def match(k: SearchKey) -> bool:
        return search_matches(k, record, seq, largest_seq, largest_uid, message, recent)

    op, args = key.op, key.args
    if op == "AND":
        return all(match(a) for a in args if isinstance(a, SearchKey))
    if op == "OR":
        return any(match(a) for a in args if isinstance(a, SearchKey))
    if op == "NOT":
        return not any(match(a) for a in args if isinstance(a, SearchKey))
    if op == "ALL":
        return True
    if op == "SEQ" and isinstance(args[0], SequenceSet):
        return args[0].contains(seq, largest_seq)
    if op == "UID" and isinstance(args[0], SequenceSet):
        return args[0].contains(record.uid, largest_uid)
    if op in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[op]
        return (flag in record.flags) == present
    if op in ("KEYWORD", "UNKEYWORD"):
        has = any(str(args[0]).lower() == f.lower() for f in record.flags)
        return has == (op == "KEYWORD")
    if op == "RECENT":
        return recent
    if op == "NEW":
        return recent and "\\Seen" not in record.flags
    if op == "OLD":
        return not recent
    if op == "LARGER":
        return record.size > int(str(args[0]))
    if op == "SMALLER":
        return record.size < int(str(args[0]))
    if op in ("BEFORE", "ON", "SINCE") and isinstance(args[0], dt.date):
        day = dt.datetime.fromtimestamp(record.internaldate, dt.UTC).date()
        return {"BEFORE": day < args[0], "ON": day == args[0], "SINCE": day >= args[0]}[op]
    if op in _SENT_KEYS and isinstance(args[0], dt.date):
        sent = message().sent_date() or _NO_SENT_DATE
        return {
            "SENTBEFORE": sent < args[0],
            "SENTON": sent == args[0],
            "SENTSINCE": sent >= args[0],
        }[op]
    if op == "MODSEQ":
        return record.modseq >= int(str(args[-1]))
    if op in _BODY_KEYS:
        found = message()
        if op == "BODY":
            return str(args[0]).lower().encode() in found.section(_TEXT).lower()
        if op == "TEXT":
            return str(args[0]).lower().encode() in found.wire.lower()
        field, needle = (op, str(args[0])) if op != "HEADER" else (str(args[0]), str(args[1]))
        value = found.section(Section(text="HEADER.FIELDS", fields=(field.upper(),)))
        if not needle:
            return len(value) > 2
        # The field's value only, not its name (RFC 9051 §6.4.4: "contains
        # the specified string in the field-body"), unfolded (RFC 5322
        # §2.2.3) and with RFC 2047 encoded words decoded, as Dovecot does.
        unfolded = re.sub(rb"\r\n(?=[ \t])", b"", value)
        bodies = [line.partition(b":")[2] for line in unfolded.split(b"\r\n")]
        return any(needle.lower() in decoded_field(body).lower() for body in bodies)
    return False
