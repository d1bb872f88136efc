"""RFC 5322 address lists -> IMAP ENVELOPE address structures (RFC 9051 §7.5.2).

Each address is ``(name, adl, mailbox, host)``; a group is opened by
``(NIL, NIL, group-name, NIL)`` and closed by ``(NIL, NIL, NIL, NIL)``.
Names are the phrase as written with quotes removed: RFC 2047 encoded
words stay encoded, as RFC 9051 §7.5.2 asks of ENVELOPE.

Written by hand: ``email.utils.getaddresses`` drops group names, and
``email.headerregistry`` decodes encoded words and is a private parser
underneath.  Like Dovecot's, this parser never fails: what it cannot read
it skips, and a missing local part or domain becomes ``MISSING_MAILBOX`` /
``MISSING_DOMAIN`` (a NIL host would read as group syntax).  One pass over
a regular-expression tokenizer, so linear in the header's length.
"""

from __future__ import annotations

import re

MAX_ADDRESSES = 1000  # per header field

MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"

_TOKEN = re.compile(
    rb"""\s*(?:
        (?P<q>"(?:[^"\\]|\\.)*"?)          # quoted-string (an open one runs to the end)
      | (?P<l>\[(?:[^\]\\]|\\.)*\]?)       # domain literal
      | (?P<c>\()                          # a comment: skipped by hand (nesting)
      | (?P<s>[<>,:;@.])                   # specials that shape the list
      | (?P<a>[^\s"(),.:;<>@\[]+)          # atom (anything else, lenient)
    )""",
    re.VERBOSE | re.DOTALL,
)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
# A field that is one bare addr-spec of dot-separated atoms (``To:
# a.b@example.org``), the commonest value: answered without the tokenizer,
# with what it would give.  The atom is _TOKEN's.
_ATOMS = rb'[^\s"(),.:;<>@\[]+(?:\.[^\s"(),.:;<>@\[]+)*'
_BARE_ADDRESS = re.compile(rb"\s*(" + _ATOMS + rb")@(" + _ATOMS + rb")\s*")
_PARENS = re.compile(rb"\\.|[()]", re.DOTALL)

Addr = tuple[bytes | None, bytes | None, bytes | None, bytes | None]
_Token = tuple[str, bytes]  # kind ("q", "l", "s", "a"), text as written


def _skip_comment(text: bytes, pos: int) -> int:
    """``pos`` is just past "(": the offset after the matching ")"."""
    depth = 1
    for m in _PARENS.finditer(text, pos):
        if m.group() == b"(":
            depth += 1
        elif m.group() == b")":
            depth -= 1
            if depth == 0:
                return m.end()
    return len(text)


def _tokens(text: bytes) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            break  # only trailing white space is left
        pos = m.end()
        kind = m.lastgroup or "a"
        if kind == "c":
            pos = _skip_comment(text, pos)
            continue
        out.append((kind, m.group(kind)))
    return out


def _phrase(words: list[_Token]) -> bytes | None:
    """A display name: words joined by one space, quotes removed."""
    out = b""
    for kind, text in words:
        if kind == "q":
            body = text[1:-1] if len(text) > 1 and text.endswith(b'"') else text[1:]
            text = _QUOTED_PAIR.sub(rb"\1", body)
        if out and kind != "s" and not out.endswith(b"."):
            out += b" "
        out += text
    return out or None


def _addr_spec(tokens: list[_Token], name: bytes | None, adl: bytes | None) -> Addr:
    """``local@domain`` from its tokens (white space and comments dropped)."""
    at = next(
        (i for i, (kind, text) in enumerate(tokens) if kind == "s" and text == b"@"), len(tokens)
    )
    local = b"".join(text for _, text in tokens[:at])
    domain = b"".join(text for _, text in tokens[at + 1 :])
    return (name, adl, local or MISSING_MAILBOX, domain or MISSING_DOMAIN)


def _angle(tokens: list[_Token], i: int) -> tuple[bytes | None, list[_Token], int]:
    """Inside ``<...>`` from ``i`` (just past "<"): the source route (RFC
    5322 §4.4 obs-route, ``@a,@b:``), the addr-spec tokens, and the index
    past ">"."""
    inner: list[_Token] = []
    while i < len(tokens) and tokens[i] != ("s", b">"):
        inner.append(tokens[i])
        i += 1
    route: bytes | None = None
    if inner[:1] == [("s", b"@")]:
        colon = next((k for k, t in enumerate(inner) if t == ("s", b":")), -1)
        if colon >= 0:
            route = b"".join(text for _, text in inner[:colon]) or None
            inner = inner[colon + 1 :]
    return route, inner, i + 1


def address_list(value: bytes | None) -> list[Addr] | None:
    """The addresses (and group markers) of an address-list field value;
    None when the field is absent or holds none."""
    if value is None:
        return None
    bare = _BARE_ADDRESS.fullmatch(value)
    if bare is not None:
        return [(None, None, bare[1], bare[2])]
    return _parsed(value)


def _parsed(value: bytes) -> list[Addr] | None:
    """``address_list`` by the tokenizer: any value."""
    tokens = _tokens(value)
    out: list[Addr] = []
    words: list[_Token] = []
    in_group = False
    i = 0
    while i < len(tokens) and len(out) < MAX_ADDRESSES:
        kind, text = tokens[i]
        i += 1
        if kind != "s" or text in (b".", b"@"):
            words.append((kind, text))
            continue
        if text == b"<":
            route, inner, i = _angle(tokens, i)
            if inner:
                out.append(_addr_spec(inner, _phrase(words), route))
            words = []
            while i < len(tokens) and not (tokens[i][0] == "s" and tokens[i][1] in (b",", b";")):
                i += 1  # junk after ">" up to the next separator
        elif text == b":" and not in_group:
            out.append((None, None, _phrase(words) or b"", None))
            in_group = True
            words = []
        elif text in (b",", b";", b">", b":"):
            if words:
                out.append(_addr_spec(words, None, None))
                words = []
            if text == b";" and in_group:
                out.append((None, None, None, None))
                in_group = False
    if words and len(out) < MAX_ADDRESSES:
        out.append(_addr_spec(words, None, None))
    if in_group:
        out.append((None, None, None, None))
    return out or None
