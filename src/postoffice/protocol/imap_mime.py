"""The MIME tree of a message with exact octet ranges, for IMAP FETCH.

IMAP addresses a message by byte ranges (RFC 9051 §6.4.5: BODY[1.2.MIME],
``<partial>``, body sizes in BODYSTRUCTURE), so every part here records
where its header starts, where its body starts and where it ends, as
offsets into the message in *wire form* (CRLF line ends, the house rule in
``dotstuff.to_crlf``).  All sizes and sections then fall out as slices.

Written by hand, not with Python's ``email`` package, because:

* ``email`` gives no offsets: a part's payload is re-serialised text, so
  BODY[1] and the size in BODYSTRUCTURE would not be the octets stored.
* With ``policy=compat32`` an 8-bit header value comes back as a ``Header``
  object and its parameter parser reorders and half-decodes RFC 2231
  parameters; IMAP wants the values as written (RFC 9051 §7.5.2).

The boundary split follows RFC 2046 §5.1.1: a delimiter is CRLF ``--``
boundary (the CRLF belongs to the delimiter), optional white space, CRLF;
``--`` after the boundary closes.  A missing close delimiter ends the last
part at the end of its parent; a multipart with no boundary or no parts has
no children (BODYSTRUCTURE shows one empty text part, as Dovecot does).

Bounds on attacker input: ``MAX_DEPTH`` nested multiparts and
message/rfc822 parts (deeper ones become opaque application/octet-stream
leaves, so recursion never passes ``MAX_DEPTH``), ``MAX_PARTS`` parts in
all (past it, no more parts are split out and deeper multiparts become
leaves).  CPU is
O(message size * depth): each level searches its own range for its
boundary with ``bytes.find`` (fast C), a few hundred MB/s in the worst
case; the session may run this in an executor for big messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_DEPTH = 100
MAX_PARTS = 10_000
MAX_PARAMS = 100  # parameters kept per Content-Type / Content-Disposition

_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# RFC 2045 §5.1 parameter: token "=" (token / quoted-string); lenient about
# white space and missing quotes' ends.
_PARAM = re.compile(rb'\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;\s]*)', re.DOTALL)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_MESSAGE_TYPES = frozenset({("message", "rfc822"), ("message", "global")})
_IDENTITY_CTE = frozenset({"", "7bit", "8bit", "binary"})


@dataclass(frozen=True, slots=True)
class Field:
    """One header field: ``name`` upper-cased, ``raw`` the field as written
    (folded, with its CRLF), ``value`` unfolded without the CRLF."""

    name: str
    raw: bytes
    value: bytes


@dataclass(slots=True)
class Part:
    """One MIME entity: octets ``start:body_start`` are its header (with the
    blank line), ``body_start:end`` its body, in the wire-form message."""

    start: int
    body_start: int
    end: int
    fields: list[Field]
    type: bytes = b"text"  # as written, for BODYSTRUCTURE
    subtype: bytes = b"plain"
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)  # multipart only
    message: Part | None = None  # message/rfc822: the encapsulated message
    multipart: bool = False
    # Lines of the body (imap_fetch counts them once for BODY and
    # BODYSTRUCTURE both); -1: not counted yet.
    lines: int = -1

    def key(self) -> tuple[str, str]:
        return self.type.decode("latin-1").lower(), self.subtype.decode("latin-1").lower()

    def get(self, name: str) -> bytes | None:
        """The first ``name`` field's unfolded value (RFC 5322 §2.2.3)."""
        for f in self.fields:
            if f.name == name:
                return f.value
        return None

    def encoding(self) -> str:
        value = self.get("CONTENT-TRANSFER-ENCODING")
        return value.strip().decode("latin-1").lower() if value else ""

    def is_text(self) -> bool:
        return not self.multipart and self.message is None and self.key()[0] == "text"


def parse_fields(block: bytes) -> list[Field]:
    """The fields of a header block (CRLF lines).  A line that is neither a
    field nor a continuation is skipped, as Dovecot does."""
    fields: list[Field] = []
    lines = block.split(b"\r\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        m = _FIELD_NAME.match(line)
        if m is None:
            continue
        parts = [line]
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            parts.append(lines[i])
            i += 1
        raw = b"\r\n".join(parts) if len(parts) > 1 else line
        value = raw[m.end() :].lstrip(b" \t")
        if b"\n" in value:  # folded: most fields are not, and need no regex
            value = _FOLD.sub(b"", value)
        fields.append(Field(m.group(1).decode("ascii").upper(), raw + b"\r\n", value))
    return fields


def unquote(value: bytes) -> bytes:
    """A parameter value without its quotes and quoted-pairs (RFC 2045 §5.1)."""
    if value[:1] == b'"':
        value = value[1:-1] if len(value) > 1 and value.endswith(b'"') else value[1:]
        return _QUOTED_PAIR.sub(rb"\1", value)
    return value


def parse_params(value: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``type/sub; a=b; c="d"`` -> (b"type/sub", [(b"a", b"b"), (b"c", b"d")]).
    RFC 2231 continuations (``name*0*=``, ``name*1*=``) are joined into one
    parameter, ``name*`` if its first section is charset-encoded, else
    ``name`` (RFC 2231 §3, §4.1), as Dovecot answers; the encoding itself
    (``utf-8''...``) is kept as written, for the client to decode."""
    head, _, rest = value.partition(b";")
    params: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(rest) and len(params) < MAX_PARAMS:
        m = _PARAM.match(rest, pos)
        if m is None:
            nxt = rest.find(b";", pos)
            if nxt < 0:
                break
            pos = nxt + 1
            continue
        params.append((m.group(1), unquote(m.group(2))))
        pos = m.end()
        nxt = rest.find(b";", pos)
        if nxt < 0:
            break
        pos = nxt + 1
    return head.strip(), _join_continuations(params)


_SECTION = re.compile(rb"(.+?)\*(\d+)(\*?)$")


def _join_continuations(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    sections: dict[bytes, list[tuple[int, bool, bytes]]] = {}
    out: list[tuple[bytes, bytes] | bytes] = []  # bytes: where a joined one goes
    for name, value in params:
        m = _SECTION.match(name)
        if m is None:
            out.append((name, value))
            continue
        base = m.group(1)
        if base.lower() not in sections:
            sections[base.lower()] = []
            out.append(base)
        sections[base.lower()].append((int(m.group(2)), bool(m.group(3)), value))
    joined = []
    for entry in out:
        if isinstance(entry, tuple):
            joined.append(entry)
            continue
        parts = sorted(sections[entry.lower()], key=lambda p: p[0])
        encoded = parts[0][0] == 0 and parts[0][1]
        joined.append((entry + b"*" if encoded else entry, b"".join(p[2] for p in parts)))
    return joined


def _header_end(data: bytes, start: int, end: int) -> int:
    """Where the body starts: after the first empty line, or ``end``."""
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        return start + 2
    blank = data.find(b"\r\n\r\n", start, end)
    return end if blank < 0 else blank + 4


class _Budget:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts = 0


def parse(data: bytes) -> Part:
    """The MIME tree of a wire-form (CRLF) message."""
    return _entity(data, 0, len(data), 0, _Budget(), digest=False)


def _entity(
    data: bytes, start: int, end: int, depth: int, budget: _Budget, *, digest: bool
) -> Part:
    budget.parts += 1
    body_start = _header_end(data, start, end)
    part = Part(start, body_start, end, parse_fields(data[start:body_start]))
    ctype = part.get("CONTENT-TYPE")
    full, params = parse_params(ctype) if ctype is not None else (b"", [])
    kind, slash, sub = full.partition(b"/")
    if slash and kind.strip() and sub.strip():
        part.type, part.subtype, part.params = kind.strip(), sub.strip(), params
    elif digest:  # RFC 2046 §5.1.5: the default inside multipart/digest
        part.type, part.subtype = b"message", b"rfc822"
    else:  # RFC 2045 §5.2: no (or an unreadable) Content-Type
        part.params = [(b"charset", b"us-ascii")]
    key = part.key()
    too_deep = depth + 1 >= MAX_DEPTH or budget.parts >= MAX_PARTS
    if key[0] == "multipart" or key in _MESSAGE_TYPES:
        if too_deep:
            part.type, part.subtype = b"application", b"octet-stream"
        elif key[0] == "multipart":
            part.multipart = True
            boundary = next((v for k, v in part.params if k.lower() == b"boundary"), b"")
            if boundary:
                for s, e in _split(data, body_start, end, boundary, budget):
                    child = _entity(data, s, e, depth + 1, budget, digest=key[1] == "digest")
                    part.children.append(child)
        elif part.encoding() in _IDENTITY_CTE:
            part.message = _entity(data, body_start, end, depth + 1, budget, digest=False)
        else:  # an encoded message/rfc822 cannot be looked into (RFC 2046 §5.2.1)
            part.type, part.subtype = b"application", b"octet-stream"
    return part


def _delimiter_at(data: bytes, pos: int, end: int, dash: bytes) -> tuple[int, bool] | None:
    """If a delimiter line ``--boundary`` starts at ``pos``: the offset after
    its line and whether it is the close delimiter; else None."""
    if not data.startswith(dash, pos):
        return None
    after = pos + len(dash)
    if after > end:
        return None
    eol = data.find(b"\r\n", after, end)
    line_end = end if eol < 0 else eol
    closing = data.startswith(b"--", after) and after + 2 <= end
    if not closing and data[after:line_end].strip(b" \t"):
        return None  # "--boundaryX": another boundary, not ours
    return (end if eol < 0 else eol + 2), closing


def _split(
    data: bytes, start: int, end: int, boundary: bytes, budget: _Budget
) -> list[tuple[int, int]]:
    """The (start, end) ranges of the body parts between ``boundary``
    delimiters in ``data[start:end]`` (RFC 2046 §5.1.1)."""
    dash = b"--" + boundary
    needle = b"\r\n" + dash
    ranges: list[tuple[int, int]] = []
    part_start = -1  # -1: still in the preamble
    found = _delimiter_at(data, start, end, dash)
    pos = start
    if found is not None:
        part_start, closing = found
        if closing:
            return []
        pos = part_start
    while True:
        hit = data.find(needle, pos, end)
        if hit < 0:
            break
        found = _delimiter_at(data, hit + 2, end, dash)
        if found is None:
            pos = hit + 2
            continue
        line_after, closing = found
        if part_start >= 0:
            ranges.append((part_start, hit))
            if budget.parts + len(ranges) >= MAX_PARTS:
                return ranges  # the budget is spent: the rest is not split
        if closing:
            return ranges
        part_start = pos = line_after
    if part_start >= 0:  # no close delimiter: the last part runs to the end
        ranges.append((part_start, end))
    return ranges
