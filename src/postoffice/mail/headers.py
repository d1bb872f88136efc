"""Message header handling on the way in: trace headers and the header gate.

The session streams message content; it only needs the header block (to add
Message-ID/Date on submission and to read From:).  ``HeaderGate`` holds back
the first bytes until the blank line that ends the headers (or a bound),
then lets everything through untouched.  Content is in LF form here.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time

from postoffice.mail.address import Address, AddressError, parse_address

MAX_HEADER_BLOCK = 256 * 1024  # past this the rest is passed through unparsed

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(text: str, limit: int = 255) -> str:
    """Keep a client-supplied token printable and single-line (no header injection)."""
    return _UNSAFE.sub("?", text)[:limit]


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
    lines = [f"Received: from {_clean(helo) or 'unknown'} ([{client_ip}])"]
    lines.append(f"\tby {hostname} (postoffice) with {protocol} id {queue_id}")
    if tls:
        lines.append(f"\t(using {_clean(tls)})")
    when = email.utils.format_datetime(email.utils.localtime())
    lines.append(f"\tfor <{recipient}>; {when}" if recipient else f"\t; {when}")
    return ("\n".join(lines) + "\n").encode("utf-8")


class HeaderGate:
    def __init__(self, *, received: bytes, submission: bool, hostname: str) -> None:
        self._received = received
        self._submission = submission
        self._hostname = hostname
        self._held = bytearray()
        self._open = False
        self.header_block = b""

    def feed(self, data: bytes) -> bytes:
        if self._open:
            return data
        self._held += data
        end = _end_of_headers(self._held)
        if end < 0 and len(self._held) < MAX_HEADER_BLOCK:
            return b""
        return self._release(end)

    def finish(self) -> bytes:
        if self._open:
            return b""
        return self._release(_end_of_headers(self._held))

    def _release(self, end: int) -> bytes:
        self._open = True
        held = bytes(self._held)
        self._held.clear()
        if end < 0:
            end = len(held)
        self.header_block = held[:end]
        added = self._added_headers() if self._submission else b""
        return self._received + added + held

    def _added_headers(self) -> bytes:
        names = _header_names(self.header_block)
        added = []
        if "date" not in names:
            added.append(f"Date: {email.utils.format_datetime(email.utils.localtime())}\n")
        if "message-id" not in names:
            stamp = f"{time.time_ns():x}.{secrets.token_hex(8)}"
            added.append(f"Message-ID: <{stamp}@{self._hostname}>\n")
        return "".join(added).encode("ascii")

    def from_addresses(self) -> list[Address | None]:
        """Addresses in the From: header(s); None for one that does not parse."""
        values = _header_values(self.header_block, "from")
        result: list[Address | None] = []
        for _name, addr in email.utils.getaddresses(values):
            try:
                result.append(parse_address(addr, utf8=True) if addr else None)
            except AddressError:
                result.append(None)
        if values and not result:
            result.append(None)
        return result


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
