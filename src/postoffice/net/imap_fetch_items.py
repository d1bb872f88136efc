"""FETCH data items and SEARCH keys answered from a message's bytes and record.

Pure functions, no I/O: the IMAP session reads the file (in its executor)
and asks these for BODY[...] sections (RFC 9051 §6.4.5), partials, sizes,
INTERNALDATE, and whether a message matches SEARCH criteria (§6.4.4).

Sections: the whole message, HEADER, HEADER.FIELDS (.NOT), TEXT, and part
numbers of a message that is not multipart (part 1 is its body, §6.4.5).
Parts of a multipart message, MIME, ENVELOPE and BODYSTRUCTURE are
``protocol/imap_fetch.py``'s (being written); until it lands they are
left out of the FETCH response.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

from postoffice.protocol.imap_events import FetchItem, SearchKey, Section, SequenceSet
from postoffice.protocol.imap_response import Atom, Raw, Value
from postoffice.storage.imap_index import MessageRecord

_FIELD = re.compile(rb"^([^:\s]+)\s*:", re.MULTILINE)
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

# Items answered from the index alone; everything else needs the file.
_FROM_RECORD = frozenset({"FLAGS", "UID", "INTERNALDATE", "MODSEQ"})


def crlf(stored: bytes) -> bytes:
    """The message as IMAP sends it: CRLF line endings (files keep LF)."""
    return stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def wire_size(record: MessageRecord) -> int | None:
    """RFC822.SIZE from the ``W=`` in the file name, if it has one."""
    match = re.search(r",W=(\d+)", record.stem)
    return int(match.group(1)) if match else None


def needs_body(items: tuple[FetchItem, ...], record: MessageRecord) -> bool:
    for item in items:
        if item.name in _FROM_RECORD:
            continue
        if item.name == "RFC822.SIZE" and wire_size(record) is not None:
            continue
        return True
    return False


def internaldate_text(seconds: int) -> str:
    """RFC 9051 §9 date-time, in UTC: ``"17-Jul-1996 02:44:25 +0000"``."""
    t = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return f"{t.day:02d}-{_MONTHS[t.month - 1]}-{t.year:04d} {t:%H:%M:%S} +0000"


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header with its blank line, text) of a CRLF message."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 4], message[end + 4 :]


def header_fields(header: bytes, names: tuple[str, ...], *, exclude: bool) -> bytes:
    """HEADER.FIELDS (or .NOT): the matching fields, folded lines kept,
    and the blank line that ends a header (RFC 9051 §6.4.5)."""
    wanted = {n.upper() for n in names}
    out: list[bytes] = []
    keep = False
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").upper()
        keep = (name in wanted) != exclude
        if keep:
            out.append(line)
    return b"".join(part + b"\r\n" for part in out) + b"\r\n"


def _is_multipart(header: bytes) -> bool:
    text = header_fields(header, ("CONTENT-TYPE",), exclude=False)
    return b"multipart/" in text.lower()


def section_bytes(message: bytes, section: Section) -> bytes | None:
    """The octets of ``section`` of a CRLF message; None where not known."""
    header, text = split_message(message)
    if section.part:
        if section.part != (1,) or _is_multipart(header):
            return None
        if section.text in ("", "TEXT"):
            return text
        return None  # MIME or a header of part 1: not yet
    match section.text:
        case "":
            return message
        case "HEADER":
            return header
        case "TEXT":
            return text
        case "HEADER.FIELDS":
            return header_fields(header, section.fields, exclude=False)
        case "HEADER.FIELDS.NOT":
            return header_fields(header, section.fields, exclude=True)
    return None


def fetch_values(
    items: tuple[FetchItem, ...], record: MessageRecord, message: bytes | None
) -> list[Value]:
    """The ``(name value ...)`` list of one FETCH response; ``message`` is
    the CRLF message, or None when no item needs it."""
    out: list[Value] = []
    for item in items:
        name = item.name
        if name == "UID":
            out += [Atom("UID"), record.uid]
        elif name == "FLAGS":
            out += [Atom("FLAGS"), [Atom(f) for f in sorted(record.flags)]]
        elif name == "INTERNALDATE":
            out += [Atom("INTERNALDATE"), internaldate_text(record.internaldate)]
        elif name == "MODSEQ":
            out += [Atom("MODSEQ"), [record.modseq]]
        elif name == "RFC822.SIZE":
            size = wire_size(record)
            if size is None:
                size = len(message or b"")
            out += [Atom("RFC822.SIZE"), size]
        elif message is None:
            continue
        elif name == "RFC822":
            out += [Atom("RFC822"), message]
        elif name == "RFC822.HEADER":
            out += [Atom("RFC822.HEADER"), split_message(message)[0]]
        elif name == "RFC822.TEXT":
            out += [Atom("RFC822.TEXT"), split_message(message)[1]]
        elif name in ("BODY", "BINARY") and item.section is not None:
            data = section_bytes(message, item.section)
            label = name + item.section.to_wire()
            if item.partial is not None:
                start, length = item.partial
                label += f"<{start}>"
                if data is not None:
                    data = data[start : start + length]
            out += [Raw(label), data]
        elif name == "BINARY.SIZE" and item.section is not None:
            data = section_bytes(message, item.section)
            out += [Raw("BINARY.SIZE" + item.section.to_wire()), len(data or b"")]
        # ENVELOPE, BODYSTRUCTURE, BODY: left out until protocol/imap_fetch.py lands.
    return out


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
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})


def search_needs_body(key: SearchKey) -> bool:
    if key.op in _BODY_KEYS:
        return True
    return any(isinstance(a, SearchKey) and search_needs_body(a) for a in key.args)


def search_matches(
    key: SearchKey,
    record: MessageRecord,
    seq: int,
    largest_seq: int,
    largest_uid: int,
    message: Callable[[], bytes],
) -> bool:
    """Whether the message (``seq``, ``record``; ``message`` gives its CRLF
    bytes when a key needs them) matches ``key`` (RFC 9051 §6.4.4)."""

    def match(k: SearchKey) -> bool:
        return search_matches(k, record, seq, largest_seq, largest_uid, message)

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
    if op in ("NEW", "RECENT"):
        return False  # no \Recent (gone in IMAP4rev2)
    if op == "OLD":
        return True
    if op == "LARGER":
        return record.size > int(str(args[0]))
    if op == "SMALLER":
        return record.size < int(str(args[0]))
    if op in ("BEFORE", "ON", "SINCE") and isinstance(args[0], dt.date):
        day = dt.datetime.fromtimestamp(record.internaldate, dt.UTC).date()
        return {"BEFORE": day < args[0], "ON": day == args[0], "SINCE": day >= args[0]}[op]
    if op == "MODSEQ":
        return record.modseq >= int(str(args[-1]))
    if op in _BODY_KEYS:
        header, text = split_message(message())
        if op == "BODY":
            return str(args[0]).lower().encode() in text.lower()
        if op == "TEXT":
            return str(args[0]).lower().encode() in (header + text).lower()
        field, needle = (op, str(args[0])) if op != "HEADER" else (str(args[0]), str(args[1]))
        value = header_fields(header, (field,), exclude=False)
        if not needle:
            return len(value) > 2
        return needle.lower().encode() in value.lower()
    # SENT* dates need the Date: header parsed: not yet (matches nothing).
    return False
