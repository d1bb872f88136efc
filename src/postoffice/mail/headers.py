"""Message header handling on the way in: trace headers and the header gate.

The session streams message content; it only needs the header block (to add
Message-ID/Date on submission and to read From:).  ``HeaderGate`` holds back
the first bytes until the blank line that ends the headers (or a bound),
then lets everything through untouched.  Content is in LF form here.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import secrets
import time

from postoffice.mail.address import (
    MAX_DOMAIN,
    Address,
    AddressError,
    normalise_domain,
    parse_address,
)

MAX_HEADER_BLOCK = 256 * 1024  # past this the rest is passed through unparsed

_UNSAFE = re.compile(r"[^\x21-\x7e]")
# In the From part of Received: (RFC 5321 §4.4 Extended-Domain), what is not
# a domain character or atext: RFC 5322 specials such as "(" and ")" would
# open or close a comment of their own.
_NOT_DOMAIN = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")


def _clean(text: str, limit: int = 255) -> str:
    """Keep a client-supplied token printable and single-line (no header injection)."""
    return _UNSAFE.sub("?", text)[:limit]


def _helo_token(helo: str) -> str:
    """The HELO name as the From part of Received:.  Any name is accepted at
    HELO (as Postfix does by default: RFC 5321 §4.1.4 and many clients send
    less than a domain), so it is made safe here: an address literal stays as
    it is, anything else keeps only domain and atext characters, every other
    one (parentheses, quotes, backslashes, ";", non-ASCII) becoming "?", so
    the trace field keeps its comment structure (Postfix writes ``a?b?c`` for
    ``a)b(c`` too)."""
    if helo.startswith("["):
        try:
            return normalise_domain(helo[:MAX_DOMAIN])
        except AddressError:
            pass
    return _NOT_DOMAIN.sub("?", helo)[:MAX_DOMAIN]


_date_memo: list[tuple[int, str]] = [(-1, "")]  # (second, its RFC 5322 form)


def rfc5322_now() -> str:
    """The local time as an RFC 5322 date-time; made once per second, since
    ``email.utils`` takes a visible share of a message's CPU time."""
    now = int(time.time())
    second, text = _date_memo[0]
    if second != now:
        moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
        text = email.utils.format_datetime(email.utils.localtime(moment))
        _date_memo[0] = (now, text)
    return text


def trace_headers(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: Address | None,
    tls: str | None,
) -> bytes:
    """The Received: header (RFC 5321 §4.4, RFC 3848 protocol names)."""
    lines = [f"Received: from {_helo_token(helo) or 'unknown'} ([{client_ip}])"]
    lines.append(f"\tby {hostname} (postoffice) with {protocol} id {queue_id}")
    if tls:
        lines.append(f"\t(using {_clean(tls)})")
    when = rfc5322_now()
    lines.append(f"\tfor <{recipient}>; {when}" if recipient else f"\t; {when}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class HeaderGate:
    """Holds message content back until the header block is complete.

    ``hold_all``: keep the whole message until ``finish`` (inbound checks
    such as DKIM need the body before their verdict header can be written
    at the top).  The caller bounds the size (the SMTP size limit).
    """

    def __init__(
        self, *, received: bytes, submission: bool, hostname: str, hold_all: bool = False
    ) -> None:
        self._received = received
        self._submission = submission
        self._hostname = hostname
        self.hold_all = hold_all
        self._held = bytearray()
        self._open = False
        self.header_block = b""
        # The header block passed MAX_HEADER_BLOCK without ending: what follows
        # was never parsed, so From:/Sender: checks cannot see all of it.
        self.header_overflow = False

    def feed(self, data: bytes) -> bytes:
        if self._open:
            return data
        self._held += data
        if self.hold_all:
            return b""
        end = _end_of_headers(self._held)
        if end < 0:
            if len(self._held) < MAX_HEADER_BLOCK:
                return b""
            self.header_overflow = True
        return self._release(end)

    def held(self) -> bytes:
        """The content received so far and not yet released (hold_all: the message)."""
        return bytes(self._held)

    def finish(self, extra: bytes = b"") -> bytes:
        """Release what is held; ``extra`` header lines go right after Received:."""
        if self._open:
            return b""
        return self._release(_end_of_headers(self._held), extra)

    def _release(self, end: int, extra: bytes = b"") -> bytes:
        self._open = True
        held = bytes(self._held)
        self._held.clear()
        if end < 0:
            end = len(held)
        block = strip_forged_auth_results(held[:end], self._hostname)
        held = block + held[end:]
        self.header_block = block
        added = self._added_headers() if self._submission else b""
        return self._received + extra + added + held

    def _added_headers(self) -> bytes:
        names = _header_names(self.header_block)
        added = []
        if "date" not in names:
            added.append(f"Date: {rfc5322_now()}\n")
        if "message-id" not in names:
            stamp = f"{time.time_ns():x}.{secrets.token_hex(8)}"
            added.append(f"Message-ID: <{stamp}@{self._hostname}>\n")
        return "".join(added).encode("ascii")

    def headers(self) -> bytes:
        """The header block as received (still held or already released)."""
        if self._open:
            return self.header_block
        end = _end_of_headers(self._held)
        return bytes(self._held[: end if end >= 0 else len(self._held)])

    def from_addresses(self) -> list[Address | None]:
        """Addresses in the From: and Sender: header(s); None for one that does
        not parse.  Sender: names who sent the message (RFC 5322 §3.6.2), so a
        user may no more claim another's address there than in From:."""
        block = self.headers()
        values = _header_values(block, "from") + _header_values(block, "sender")
        result: list[Address | None] = []
        try:
            parsed = email.utils.getaddresses(values)
        except RecursionError:  # nested comments: "((((...": nothing we can check
            return [None]
        for _name, addr in parsed:
            try:
                result.append(parse_address(addr, utf8=True) if addr else None)
            except AddressError:
                result.append(None)
        if values and not result:
            result.append(None)
        return result


_FIELD = re.compile(
    rb"^([!-9;-~]+)[ \t]*:((?:[^\n]*(?:\n|\Z))(?:[ \t][^\n]*(?:\n|\Z))*)", re.MULTILINE
)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# RFC 2045 token: no SPACE, CTLs or tspecials ()<>@,;:\"/[]?=
_TOKEN_END = frozenset(b' \t\r\n()<>@,;:\\"/[]?=')


def _skip_cfws(text: bytes, i: int) -> int:
    """Index of the first octet at or after ``i`` that is not white space or a
    (nested, RFC 5322 §3.2.2) comment; one linear pass."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == 0x5C:  # quoted-pair inside a comment
                i += 1
            elif c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
        elif c == 0x28:
            depth = 1
        elif c not in b" \t\r\n":
            return i
        i += 1
    return i


def authserv_id(value: bytes) -> bytes:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2: a
    token or a quoted-string after CFWS), unquoted, lower case, without a
    trailing dot; so ``"Mail.Example.Test"`` and ``mail.example.test.`` read
    as the host name they claim."""
    text = _FOLD.sub(b"", value)
    i = _skip_cfws(text, 0)
    out = bytearray()
    if text[i : i + 1] == b'"':
        i += 1
        while i < len(text) and text[i] != 0x22:
            if text[i] == 0x5C:  # quoted-pair
                i += 1
            out += text[i : i + 1]
            i += 1
    else:
        while i < len(text) and text[i] not in _TOKEN_END:
            out.append(text[i])
            i += 1
    return bytes(out).strip().lower().rstrip(b".")


def strip_forged_auth_results(block: bytes, hostname: str) -> bytes:
    """Remove Authentication-Results fields that claim to be ours (RFC 8601 §5):
    only this server may speak for its own authserv-id, however a forger
    spells it (case, quotes, comments, a trailing dot)."""
    if b"authentication-results" not in block.lower():
        return block  # the common case: nothing to parse
    ours = hostname.lower().rstrip(".").encode("ascii")

    def keep(m: re.Match[bytes]) -> bytes:
        if m.group(1).lower() == b"authentication-results" and authserv_id(m.group(2)) == ours:
            return b""
        return m.group(0)

    return _FIELD.sub(keep, block)


def field_values(block: bytes, name: str) -> list[bytes]:
    """The values of the fields called ``name`` (case-insensitive) in the
    header block ``block``, in order, unfolded."""
    wanted = name.lower().encode("ascii")
    return [
        _FOLD.sub(b"", m.group(2)).strip()
        for m in _FIELD.finditer(block)
        if m.group(1).lower() == wanted
    ]


def header_block(message: bytes) -> bytes:
    """The header section of ``message`` (LF form), up to the blank line."""
    end = _end_of_headers(message)
    return message if end < 0 else message[:end]


def count_fields(block: bytes, name: str) -> int:
    """How many header fields called ``name`` (case-insensitive) ``block`` has."""
    wanted = name.lower().encode("ascii")
    return sum(1 for m in _NAME.finditer(block) if m.group(1).lower() == wanted)


def _end_of_headers(buf: bytes | bytearray) -> int:
    """Index just past the header block's last line (before the blank line), or -1."""
    if buf.startswith(b"\n"):
        return 0
    i = buf.find(b"\n\n")
    return i + 1 if i >= 0 else -1


_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


def _header_names(block: bytes) -> set[str]:
    return {m.group(1).decode("ascii").lower() for m in _NAME.finditer(block)}


def _header_values(block: bytes, wanted: str) -> list[str]:
    text = block.decode("utf-8", "replace")
    unfolded = re.sub(r"\n[ \t]", " ", text)
    values = []
    for line in unfolded.split("\n"):
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == wanted:
            values.append(value.strip())
    return values
