"""The message-structure part of IMAP FETCH, as pure functions (no I/O).

ENVELOPE and BODY/BODYSTRUCTURE (RFC 9051 §7.5.2, body grammar §9), body
sections (§6.4.5) with ``<partial>``, and BINARY / BINARY.SIZE (RFC 3516).
Values come back as ``imap_response`` values, ready for ``untagged()``:
``str`` (a UTF-8 header text), ``bytes`` (a literal: section contents, or a
header text that is not valid UTF-8), ``int``, ``None`` for NIL, tuples for
parenthesised lists.

One line-ending decision, made here once: the session hands in the stored
message (LF line ends, Maildir), and everything IMAP sees is the wire form
``dotstuff.to_crlf`` makes (the rule POP3 uses too: LF and CRLF -> CRLF, a
bare CR kept).  Offsets, sizes and line counts are of that form, so
RFC822.SIZE (``rfc822_size``) equals the length of BODY[] as sent.  Unlike
POP3's ``wire_size`` no final CRLF is added: IMAP sends the message as it
is (Dovecot does the same).

The MIME tree is ``imap_mime`` (exact byte ranges, bounded depth and part
count: see there for why it is written by hand); addresses are
``imap_address``.  CPU per call is linear in the message size times the
nesting depth (at most ``imap_mime.MAX_DEPTH``); BINARY decoding is
linear.  For a big message the session may call these in an executor.
``FetchMessage`` parses once for several items of one FETCH.
"""

from __future__ import annotations

import binascii
import datetime as dt
import email.utils
import re
from collections.abc import Sequence

from postoffice.protocol import imap_mime
from postoffice.protocol.dotstuff import to_crlf
from postoffice.protocol.imap_address import Addr, address_list
from postoffice.protocol.imap_events import FetchItem, Section
from postoffice.protocol.imap_mime import Part
from postoffice.protocol.imap_response import Raw, Value

NString = str | bytes | None

_ENVELOPE_ADDRESSES = ("FROM", "SENDER", "REPLY-TO", "TO", "CC", "BCC")
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


class UnknownTransferEncoding(ValueError):
    """BINARY of a part whose Content-Transfer-Encoding we cannot decode:
    the session answers NO [UNKNOWN-CTE] (RFC 3516 §4.3)."""


def _nstring(value: bytes | None) -> NString:
    """A header text as a string when it is UTF-8 (RFC 6532 headers, or
    ASCII), else as a literal of its octets."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _addresses(addrs: list[Addr] | None) -> Value:
    if addrs is None:
        return None
    return tuple(tuple(_nstring(v) for v in a) for a in addrs)


def _envelope(part: Part) -> tuple[Value, ...]:
    """ENVELOPE of an entity's header (RFC 9051 §7.5.2)."""
    lists = {name: address_list(part.get(name)) for name in _ENVELOPE_ADDRESSES}
    # "If the Sender or Reply-To lines are absent in the [RFC-5322] header,
    # or are present but empty, the server sets the corresponding member of
    # the envelope to be the same value as the from member."
    for name in ("SENDER", "REPLY-TO"):
        if lists[name] is None:
            lists[name] = lists["FROM"]
    return (
        _nstring(part.get("DATE")),
        _nstring(part.get("SUBJECT")),
        *(_addresses(lists[name]) for name in _ENVELOPE_ADDRESSES),
        _nstring(part.get("IN-REPLY-TO")),
        _nstring(part.get("MESSAGE-ID")),
    )


def _params(params: list[tuple[bytes, bytes]]) -> Value:
    if not params:
        return None
    return tuple(_nstring(v) for pair in params for v in pair)


def _lines(data: bytes, part: Part) -> int:
    """Lines of a body: its line ends (a last line without one is not
    counted, as Dovecot counts)."""
    if part.lines < 0:
        part.lines = data.count(b"\n", part.body_start, part.end)
    return part.lines


def _extension(part: Part) -> tuple[Value, ...]:
    """body-fld-dsp, body-fld-lang, body-fld-loc (RFC 9051 §9)."""
    disposition: Value = None
    raw = part.get("CONTENT-DISPOSITION")
    if raw is not None:
        kind, params = imap_mime.parse_params(raw)
        if kind:
            disposition = (_nstring(kind), _params(params))
    language: Value = None
    raw = part.get("CONTENT-LANGUAGE")
    if raw is not None:
        tags = [t.strip() for t in raw.split(b",") if t.strip()]
        if len(tags) == 1:
            language = _nstring(tags[0])
        elif tags:
            language = tuple(_nstring(t) for t in tags)
    location = part.get("CONTENT-LOCATION")
    return disposition, language, _nstring(location.strip() if location is not None else None)


# Dovecot's answer for a multipart with no parts: the grammar needs one body.
_EMPTY_TEXT: tuple[Value, ...] = (
    "text",
    "plain",
    ("charset", "us-ascii"),
    None,
    None,
    "7bit",
    0,
    0,
)


def _body(data: bytes, part: Part, extensible: bool) -> tuple[Value, ...]:
    """body (RFC 9051 §9) of ``part``; ``extensible``: BODYSTRUCTURE."""
    if part.multipart:
        empty = (*_EMPTY_TEXT, None, None, None, None) if extensible else _EMPTY_TEXT
        children: list[Value] = [_body(data, c, extensible) for c in part.children] or [empty]
        out: list[Value] = [*children, _nstring(part.subtype)]
        if extensible:
            out += [_params(part.params), *_extension(part)]
        return tuple(out)
    encoding = part.get("CONTENT-TRANSFER-ENCODING")
    params = part.params
    if part.is_text() and not any(k.lower() == b"charset" for k, _ in params):
        params = [
            (b"charset", b"us-ascii"),
            *params,
        ]  # RFC 2045 §5.2 default, shown as Dovecot does
    out = [
        _nstring(part.type),
        _nstring(part.subtype),
        _params(params),
        _nstring(part.get("CONTENT-ID")),
        _nstring(part.get("CONTENT-DESCRIPTION")),
        _nstring(encoding.strip()) if encoding and encoding.strip() else "7bit",
        part.end - part.body_start,
    ]
    if part.message is not None:
        out += [_envelope(part.message), _body(data, part.message, extensible), _lines(data, part)]
    elif part.is_text():
        out.append(_lines(data, part))
    if extensible:
        md5 = part.get("CONTENT-MD5")
        out += [_nstring(md5.strip() if md5 is not None else None), *_extension(part)]
    return tuple(out)


def _find(root: Part, numbers: Sequence[int]) -> Part | None:
    """The part a section-part names (RFC 9051 §6.4.5): numbers step into a
    multipart's children or a message/rfc822 part's message; part 1 of a
    message that is not multipart is its body."""
    current: Part | None = None
    for n in numbers:
        if current is None:
            container = root
        elif current.message is not None:
            container = current.message
        elif current.multipart:
            container = current
        else:
            return None
        if container.multipart:
            if not 1 <= n <= len(container.children):
                return None
            current = container.children[n - 1]
        elif n == 1 and (current is None or container is not current):
            current = container
        else:
            return None
    return current


def _header_fields(data: bytes, entity: Part, names: Sequence[str], keep: bool) -> bytes:
    """HEADER.FIELDS (``keep``) or HEADER.FIELDS.NOT: the matching fields as
    written, in their order, and the blank line (RFC 9051 §6.4.5)."""
    wanted = {n.upper() for n in names}
    return b"".join(f.raw for f in entity.fields if (f.name in wanted) == keep) + b"\r\n"


def _decode(body: bytes, encoding: str) -> bytes:
    """A body's octets under its Content-Transfer-Encoding (RFC 2045 §6),
    leniently: junk in base64 is skipped, a bad end is cut off."""
    if encoding in ("", "7bit", "8bit", "binary"):
        return body
    if encoding == "base64":
        clean = _B64_JUNK.sub(b"", body.split(b"=", 1)[0])
        clean = clean[: len(clean) - len(clean) % 4 if len(clean) % 4 == 1 else len(clean)]
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    raise UnknownTransferEncoding(encoding)


class FetchMessage:
    """One stored message, parsed once (when an item first needs its
    structure: BODY[] alone needs none) for the items of a FETCH."""

    __slots__ = ("_parsed", "wire")

    def __init__(self, stored: bytes) -> None:
        self.wire = to_crlf(stored)  # BODY[] as sent
        self._parsed: Part | None = None

    @property
    def _root(self) -> Part:
        if self._parsed is None:
            self._parsed = imap_mime.parse(self.wire)
        return self._parsed

    @property
    def size(self) -> int:
        """RFC822.SIZE: the octets of BODY[]."""
        return len(self.wire)

    def envelope(self) -> tuple[Value, ...]:
        return _envelope(self._root)

    def bodystructure(self, extensible: bool) -> tuple[Value, ...]:
        return _body(self.wire, self._root, extensible)

    def sent_date(self) -> dt.date | None:
        """The day the Date: field names, as written there: SENTBEFORE,
        SENTON and SENTSINCE disregard its time and timezone (RFC 9051
        §6.4.4).  None without a parsable Date:."""
        value = self._root.get("DATE")
        if value is None:
            return None
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
        if parsed is None:
            return None
        try:
            return dt.date(parsed[0], parsed[1], parsed[2])
        except ValueError:  # "31 Feb", year 0: not a date
            return None

    def section(self, section: Section) -> bytes:
        """BODY[section] contents; b"" for a part that does not exist."""
        if not section.part and not section.text:
            return self.wire  # BODY[]: the whole message, no parsing
        data, root = self.wire, self._root
        if not section.part:
            part: Part | None = root
        else:
            part = _find(root, section.part)
        if part is None:
            return b""
        if section.text == "MIME":
            return data[part.start : part.body_start]
        if section.part and not section.text:
            return data[part.body_start : part.end]
        # HEADER/TEXT of a part address its message/rfc822 message; of any
        # other part (not allowed by §6.4.5) the part's own header and body.
        entity = part.message if part.message is not None and section.part else part
        if section.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            return _header_fields(data, entity, section.fields, section.text == "HEADER.FIELDS")
        if section.text == "HEADER":
            return data[entity.start : entity.body_start]
        if section.text == "TEXT":
            return data[entity.body_start : entity.end]
        return data[entity.start : entity.end]

    def binary(self, part_numbers: Sequence[int]) -> bytes:
        """BINARY[part] (RFC 3516 §4.2): the part's body decoded; the whole
        message for no part; b"" for a part that does not exist.  Raises
        ``UnknownTransferEncoding``."""
        if not part_numbers:
            return self.wire
        part = _find(self._root, part_numbers)
        if part is None:
            return b""
        body = self.wire[part.body_start : part.end]
        if part.multipart or part.message is not None:
            return body  # composite types are never encoded (RFC 2045 §6.4)
        return _decode(body, part.encoding())


def rfc822_size(stored: bytes) -> int:
    """RFC822.SIZE of a stored message: the length of BODY[] as sent."""
    return len(to_crlf(stored))


def envelope(stored: bytes) -> tuple[Value, ...]:
    """ENVELOPE: (date subject from sender reply-to to cc bcc in-reply-to
    message-id), addresses as tuples of (name adl mailbox host)."""
    return FetchMessage(stored).envelope()


def bodystructure(stored: bytes, extensible: bool) -> tuple[Value, ...]:
    """BODYSTRUCTURE (``extensible``) or BODY without a section."""
    return FetchMessage(stored).bodystructure(extensible)


def section(stored: bytes, section: Section) -> bytes:
    """BODY[section] contents, wire form (CRLF)."""
    return FetchMessage(stored).section(section)


def binary(stored: bytes, part_numbers: Sequence[int]) -> bytes:
    """BINARY[part] contents; ``len()`` of it is BINARY.SIZE."""
    return FetchMessage(stored).binary(part_numbers)


def partial(data: bytes, span: tuple[int, int] | None) -> bytes:
    """``<start.length>`` applied (RFC 9051 §6.4.5): b"" past the end."""
    if span is None:
        return data
    start, length = span
    return data[start : start + length]


def response_name(item: FetchItem) -> Raw:
    """The item's name in the FETCH response: no ``.PEEK``; a partial shows
    only its start (RFC 9051 §7.5.2, ``BODY[]<0>``)."""
    if item.section is None:
        return Raw(item.name)
    name = item.name + item.section.to_wire()
    if item.partial is not None:
        name += f"<{item.partial[0]}>"
    return Raw(name)
