"""ManageSieve (RFC 5804) server side, sans I/O: bytes in, commands out, replies as bytes.

Users edit their Sieve scripts with Thunderbird's add-on, Roundcube's
managesieve plugin or sieve-connect; they speak this.  The core splits the
byte stream into commands: an atom and its arguments, each a quoted string
(``\\"`` and ``\\\\`` escapes), a literal (``{n+}`` CRLF and n octets, or
``{n}``, which RFC 5804 §4 lets servers take without a continuation), or a
number.  It keeps no state but the buffer and the bounds: a command line
past ``max_line``, or a literal past ``max_literal`` (which is skipped, not
held), is a ``BadCommand`` the session answers with NO; the session decides
everything else (authentication, the scripts).

AUTHENTICATE's client responses are strings on lines of their own (§2.1);
``next_command`` returns them as ``Command("", (text,))`` while the session
says an exchange is under way (``expect_sasl_response``).
"""

from __future__ import annotations

from dataclasses import dataclass

NEED_DATA = None
MAX_LINE = 8 * 1024
MAX_LITERAL = 1024 * 1024
MAX_ARGUMENTS = 8


@dataclass(frozen=True, slots=True)
class Command:
    """``name`` upper-cased; arguments: strings (UTF-8 text) or numbers."""

    name: str
    arguments: tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class BadCommand:
    """Unparsable input; ``code`` is a response code for the NO (``QUOTA/MAXSIZE``)."""

    reason: str
    code: str = ""


Event = Command | BadCommand


def quote(text: str) -> bytes:
    """A string for the wire: quoted when it can be, else a literal (§4)."""
    data = text.encode("utf-8")
    if len(data) < 1024 and not any(c in data for c in b'\r\n"\\\0'):
        return b'"' + data + b'"'
    return b"{%d}\r\n" % len(data) + data


def literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def response(kind: str, text: str = "", code: str = "") -> bytes:
    """``OK``, ``NO`` or ``BYE`` with an optional (CODE) and human text (§1.3)."""
    out = kind.encode()
    if code:
        out += b" (" + code.encode() + b")"
    if text:
        out += b" " + quote(text)
    return out + b"\r\n"


class ManageSieveServer:
    """The command reader; ``receive_data`` then ``next_command`` until NEED_DATA."""

    def __init__(self, max_line: int = MAX_LINE, max_literal: int = MAX_LITERAL) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._max_literal = max_literal
        self._skip = 0  # octets of a refused literal still to drop
        self._skip_then: BadCommand | None = None
        self.expect_sasl_response = False

    @property
    def has_buffered_data(self) -> bool:
        """Bytes wait behind the last command (STARTTLS must refuse, RFC 5804 §2.2)."""
        return bool(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buffer += data

    def next_command(self) -> Event | None:
        if self._skip:
            return NEED_DATA
        if self._skip_then is not None:
            # The refused literal is gone; what is left of its line is dropped too.
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max_line:
                    self._buffer.clear()
                return NEED_DATA
            del self._buffer[: end + 1]
            event, self._skip_then = self._skip_then, None
            return event
        return self._parse()

    def _parse(self) -> Event | None:
        buf = self._buffer
        pos = 0
        items: list[str | int] = []
        line_bytes = 0
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos + line_bytes > self._max_line:
                    buf.clear()
                    return BadCommand("line too long")
                return NEED_DATA
            line = bytes(buf[pos:end]).rstrip(b"\r")
            line_bytes += len(line)
            if line_bytes > self._max_line:
                del buf[: end + 1]
                return BadCommand("line too long")
            # Arguments on this line; a literal ends it, its octets follow.
            try:
                more, size = _split_line(line, items)
            except ValueError as exc:
                del buf[: end + 1]
                return BadCommand(str(exc))
            if len(items) > MAX_ARGUMENTS + 1:
                del buf[: end + 1]
                return BadCommand("too many arguments")
            if not more:
                del buf[: end + 1]
                return self._command(items)
            start = end + 1
            if size > self._max_literal:
                available = len(buf) - start
                self._skip = max(0, size - available)
                del buf[: min(len(buf), start + size)]
                self._skip_then = BadCommand("literal too large", "QUOTA/MAXSIZE")
                return self.next_command()
            if len(buf) - start < size:
                return NEED_DATA
            try:
                items.append(bytes(buf[start : start + size]).decode("utf-8"))
            except UnicodeDecodeError:
                del buf[: start + size]
                self._skip_then = BadCommand("string is not UTF-8")
                return self.next_command()
            pos = start + size

    def _command(self, items: list[str | int]) -> Event:
        if self.expect_sasl_response:
            if len(items) != 1 or not isinstance(items[0], str):
                return BadCommand("expected one string")
            return Command("", (items[0],))
        if not items or not isinstance(items[0], str) or not items[0].isalpha():
            return BadCommand("expected a command")
        return Command(items[0].upper(), tuple(items[1:]))


def _split_line(line: bytes, items: list[str | int]) -> tuple[bool, int]:
    """Parse ``line`` into ``items``; (True, n) when it ends in a literal of n octets."""
    i = 0
    n = len(line)
    while i < n:
        ch = line[i]
        if ch in b" \t":
            i += 1
        elif ch == ord('"'):
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted string")
                c = line[i]
                if c == ord("\\") and i + 1 < n:
                    out.append(line[i + 1])
                    i += 2
                elif c == ord('"'):
                    i += 1
                    break
                else:
                    out.append(c)
                    i += 1
            try:
                items.append(out.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError("string is not UTF-8") from None
        elif ch == ord("{"):
            close = line.find(b"}", i)
            if close < 0 or close != n - 1:
                raise ValueError("a literal must end the line")
            digits = line[i + 1 : close].rstrip(b"+")
            if not digits.isdigit() or len(digits) > 10:
                raise ValueError("bad literal length")
            return True, int(digits)
        else:
            stop = i
            while stop < n and line[stop] not in b' \t"{':
                stop += 1
            atom = line[i:stop].decode("ascii", "replace")
            items.append(int(atom) if atom.isdigit() and len(atom) <= 10 else atom)
            i = stop
    return False, 0
