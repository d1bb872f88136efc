"""A raw IMAP client over any socket, and a parser of what servers answer.

For tests that compare two servers structurally (ours and Dovecot): the
client sends tagged lines (synchronizing literals wait for ``+``), returns
every response line with its literals inline, and ``parse`` turns one
response into Python values (RFC 9051 §9 grammar, loosely): atoms as
``str`` (upper-cased when ``upper``), quoted strings and literals as
``bytes`` (so a quoted string and a literal with the same octets compare
equal, as §4.3 makes them the same string), numbers as ``int``, NIL as
None, lists as tuples.  A ``[...]`` (a response code, or the section of
``BODY[...]``) stays inside the atom it is part of.
"""

from __future__ import annotations

import re
import socket

Parsed = str | bytes | int | None | tuple["Parsed", ...]

_LITERAL_END = re.compile(rb"~?\{(\d+)\+?\}\r\n$")


class WireClient:
    """One IMAP connection: ``command`` sends a tagged line, returns every
    response line (literals inline), the tagged one last."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.n = 0
        self.greeting = self.line()

    def line(self) -> bytes:
        got = self.file.readline()
        assert got, "connection closed"
        while m := _LITERAL_END.search(got):
            got += self.file.read(int(m[1])) + self.file.readline()
        return got

    def command(self, text: str, literal: bytes | None = None) -> list[bytes]:
        self.n += 1
        tag = f"s{self.n}"
        line = f"{tag} {text}".encode()
        out: list[bytes] = []
        if literal is not None:
            self.sock.sendall(line + f" {{{len(literal)}}}\r\n".encode())
            while not (got := self.line()).startswith(b"+"):
                out.append(got)
                assert not got.startswith(tag.encode()), out
            self.sock.sendall(literal + b"\r\n")
        else:
            self.sock.sendall(line + b"\r\n")
        while True:
            got = self.line()
            out.append(got)
            if got.startswith(tag.encode() + b" "):
                return out

    def close(self) -> None:
        try:
            self.command("LOGOUT")
        finally:
            self.file.close()
            self.sock.close()


def parse(line: bytes, *, upper: bool = True) -> tuple[Parsed, ...]:
    """One response line (with its literals inline, CRLF at the end) as values."""
    values, _end = _parse_list(line, 0, upper, None)
    return values


def _parse_list(
    data: bytes, pos: int, upper: bool, close: bytes | None
) -> tuple[tuple[Parsed, ...], int]:
    out: list[Parsed] = []
    end = len(data)
    while pos < end:
        c = data[pos : pos + 1]
        if c in (b" ", b"\r", b"\n"):
            pos += 1
        elif c == close:
            return tuple(out), pos + 1
        elif c == b"(":
            inner, pos = _parse_list(data, pos + 1, upper, b")")
            out.append(inner)
        elif c == b'"':
            pos += 1
            text = bytearray()
            while data[pos : pos + 1] != b'"':
                if data[pos : pos + 1] == b"\\":
                    pos += 1
                text += data[pos : pos + 1]
                pos += 1
            out.append(bytes(text))
            pos += 1
        elif m := re.compile(rb"~?\{(\d+)\+?\}\r\n").match(data, pos):
            size = int(m[1])
            out.append(data[m.end() : m.end() + size])
            pos = m.end() + size
        else:
            start, depth = pos, 0
            while pos < end:
                ch = data[pos : pos + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth == 0 and (ch in b" ()\r\n" or ch == close):
                    break
                pos += 1
            atom = data[start:pos].decode("utf-8", "replace")
            if atom.isdigit():
                out.append(int(atom))
            elif atom.upper() == "NIL":
                out.append(None)
            else:
                out.append(atom.upper() if upper else atom)
    return tuple(out), pos
