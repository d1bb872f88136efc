"""IMAP responses as bytes (RFC 9051 §7): status lines with response codes,
untagged data, continuation requests.

Values are typed so that a string can never be emitted unsafely: ``str``
is always a *string* (quoted when every character allows it, RFC 9051 §9
``quoted``, otherwise a literal), ``bytes`` always a literal, ``Atom`` a
token written as is (validated: no space, CR, LF or other control),
``Raw`` a pre-built token such as a fetch item name ``BODY[HEADER.FIELDS
(FROM)]``, ``Mailbox`` a mailbox name in the connection's encoding,
``Wire`` a value this module encoded earlier (kept in the IMAP index's
structure cache, ``encode_value(..., utf8=False)``: valid in every mode).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from postoffice.mail import mutf7
from postoffice.protocol.imap_events import SequenceSet

MAX_QUOTED = 1024  # longer strings go as literals: cheaper for clients to read


@dataclass(frozen=True, slots=True)
class Atom:
    """A token sent as is: EXISTS, \\Seen, NIL-free keywords."""

    text: str

    def __post_init__(self) -> None:
        if not self.text or any(c in ' ()"{' or ord(c) < 0x21 or ord(c) > 0x7E for c in self.text):
            raise ValueError(f"not an atom: {self.text!r}")


@dataclass(frozen=True, slots=True)
class Raw:
    """A pre-built token that may hold spaces or parentheses (fetch item
    names); never CR, LF or NUL."""

    text: str

    def __post_init__(self) -> None:
        if any(c in "\r\n\0" for c in self.text):
            raise ValueError("CR, LF or NUL in a response token")


@dataclass(frozen=True, slots=True)
class Wire:
    """A value already in its wire form, as ``encode_value`` made it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A mailbox name, encoded as the connection needs (mUTF-7 for rev1)."""

    name: str


Value = None | int | str | bytes | Atom | Raw | Wire | Mailbox | SequenceSet | Sequence["Value"]


@dataclass(frozen=True, slots=True)
class ResponseCode:
    """A response code (RFC 9051 §7.1): ``[NAME args]``, e.g.
    ``ResponseCode("UIDNEXT", (5,))``, ``ResponseCode("TOOBIG")``."""

    name: str
    args: tuple[Value, ...] = ()

    def __post_init__(self) -> None:
        Atom(self.name)  # validates


def encode_value(value: Value, *, utf8: bool) -> bytes:
    """One value in its wire form; ``utf8``: the client is in rev2 /
    UTF8=ACCEPT mode (UTF-8 in quoted strings and mailbox names)."""
    # The common types first, tested by exact type: ENVELOPE and
    # BODYSTRUCTURE are trees of strings, NILs, numbers and lists, encoded
    # once per message the first time a client asks.
    if isinstance(value, str):
        return encode_string(value, utf8=utf8)
    if isinstance(value, tuple | list):
        return _encode_list(value, utf8)
    if value is None:
        return b"NIL"
    if isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("IMAP numbers are unsigned")
        return b"%d" % value
    if isinstance(value, Wire):
        return value.data
    if isinstance(value, Atom | Raw):
        return value.text.encode("ascii" if isinstance(value, Atom) else "utf-8")
    if isinstance(value, SequenceSet):
        return value.to_wire().encode("ascii")
    if isinstance(value, Mailbox):
        name = value.name if utf8 else mutf7.encode(value.name)
        return encode_string(name, utf8=utf8)
    if isinstance(value, bytes):
        return b"{%d}\r\n" % len(value) + value
    return b"(" + b" ".join([encode_value(v, utf8=utf8) for v in value]) + b")"


def _encode_list(values: Sequence[Value], utf8: bool) -> bytes:
    # NIL and plain ASCII strings, most members of an ENVELOPE or a
    # BODYSTRUCTURE, inline: a first FETCH of 10,000 messages encodes
    # half a million values, and a call each was a third of its CPU.
    out: list[bytes] = []
    append = out.append
    for v in values:
        if v is None:
            append(b"NIL")
        elif type(v) is str:
            if v.isascii() and len(v) <= MAX_QUOTED and _UNQUOTABLE.search(v) is None:
                append(b'"%s"' % v.encode("ascii"))
            else:
                append(encode_string(v, utf8=utf8))
        elif type(v) is tuple:
            append(_encode_list(v, utf8))
        else:
            append(encode_value(v, utf8=utf8))
    return b"(" + b" ".join(out) + b")"


_UNQUOTABLE = re.compile(r'[\r\n\0\\"]')


def encode_string(text: str, *, utf8: bool) -> bytes:
    """``text`` as a quoted string if RFC 9051 §9 allows (no CR, LF, NUL;
    8-bit only in UTF-8 mode), else as a literal."""
    if text.isascii() and len(text) <= MAX_QUOTED and _UNQUOTABLE.search(text) is None:
        return b'"%s"' % text.encode("ascii")  # the usual case: nothing to escape
    raw = text.encode("utf-8")
    quotable = (
        len(raw) <= MAX_QUOTED
        and b"\r" not in raw
        and b"\n" not in raw
        and b"\0" not in raw
        and (utf8 or text.isascii())
    )
    if quotable:
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(raw) + raw


def _text(text: str) -> bytes:
    # resp-text is TEXT-CHARs: no CR/LF; a leading "[" would read as a code.
    clean = text.replace("\r", " ").replace("\n", " ").replace("\0", " ")
    if clean.startswith("["):
        clean = " " + clean
    return clean.encode("utf-8")


def status_line(
    tag: str | None, status: str, text: str, code: ResponseCode | None = None, *, utf8: bool = True
) -> bytes:
    """``tag status [code] text`` CRLF (``*`` when tag is None): OK, NO,
    BAD, and untagged PREAUTH, BYE (RFC 9051 §7.1)."""
    if status not in ("OK", "NO", "BAD", "PREAUTH", "BYE"):
        raise ValueError(f"not a status: {status}")
    parts = [(tag or "*").encode("ascii"), status.encode("ascii")]
    if code is not None:
        inner = code.name.encode("ascii")
        if code.args:
            inner += b" " + b" ".join(encode_value(a, utf8=utf8) for a in code.args)
        parts.append(b"[" + inner + b"]")
    parts.append(_text(text or status.lower()))
    return b" ".join(parts) + b"\r\n"


def untagged(*values: Value, utf8: bool = True) -> bytes:
    """``* v1 v2 ...`` CRLF: untagged data (RFC 9051 §7.2-§7.5), e.g.
    ``untagged(3, Atom("EXISTS"))``."""
    if not values:
        raise ValueError("empty untagged response")
    return b"* " + b" ".join(encode_value(v, utf8=utf8) for v in values) + b"\r\n"


def continuation(text: str = "") -> bytes:
    """``+ text`` CRLF (RFC 9051 §7.6): base64 SASL challenges, "idling", ..."""
    return b"+ " + _text(text) + b"\r\n"
