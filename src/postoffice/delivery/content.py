"""What the SMTP client must know about a queued message before MAIL FROM.

``TraitScanner`` is fed the message in chunks (LF line endings, as stored)
and finds: the size on the wire with CRLF (RFC 1870 SIZE), whether the body
has 8-bit octets (needs BODY=8BITMIME, RFC 6152), whether the header has
(needs SMTPUTF8, RFC 6531/6532), and whether the sender asked for TLS
policies to be set aside (``TLS-Required: No``, RFC 8689 §5).  The queue
writer runs it as the message arrives, and after a restart it is recomputed from the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HIGH = re.compile(rb"[\x80-\xff]")
# RFC 8689 §5: "TLS-Required:" FWS "No" (case-insensitive), a field of its own.
_TLS_REQUIRED_NO = re.compile(rb"(?:^|\n)tls-required[ \t]*:[ \t]*no[ \t]*(?:\n|$)", re.IGNORECASE)
MAX_HEADER_COPY = 64 * 1024  # header bytes a DSN quotes (RFC 3464 §2: headers only)


@dataclass(frozen=True, slots=True)
class MessageTraits:
    crlf_size: int  # octets once every LF is CRLF and the last line is ended
    body_8bit: bool
    header_8bit: bool
    tls_optional: bool = False  # "TLS-Required: No" in the header (RFC 8689 §5)


class TraitScanner:
    def __init__(self) -> None:
        self._size = 0
        self._newlines = 0
        self._in_header = True
        self._last = b"\n"  # the message starts at the beginning of a line
        self._body_8bit = False
        self._header_8bit = False
        self._head = bytearray()  # the header, up to MAX_HEADER_COPY (TLS-Required)

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._size += len(chunk)
        self._newlines += chunk.count(b"\n")
        if self._in_header:
            # The header ends at the first empty line (RFC 5322 §2.1); look
            # across the chunk boundary with the previous chunk's last byte.
            joined = self._last + chunk
            end = joined.find(b"\n\n")
            if end < 0:
                self._header_8bit = self._header_8bit or bool(_HIGH.search(chunk))
                self._keep_header(chunk)
            else:
                split = max(end + 1 - len(self._last), 0)
                head, body = chunk[:split], chunk[split:]
                self._keep_header(head)
                self._header_8bit = self._header_8bit or bool(_HIGH.search(head))
                self._body_8bit = bool(_HIGH.search(body))
                self._in_header = False
        elif not self._body_8bit:
            self._body_8bit = bool(_HIGH.search(chunk))
        self._last = chunk[-1:]

    def _keep_header(self, data: bytes) -> None:
        room = MAX_HEADER_COPY - len(self._head)
        if room > 0:
            self._head += data[:room]

    def traits(self) -> MessageTraits:
        unterminated = 0 if self._last == b"\n" or self._size == 0 else 2
        return MessageTraits(
            crlf_size=self._size + self._newlines + unterminated,
            body_8bit=self._body_8bit,
            header_8bit=self._header_8bit,
            tls_optional=bool(_TLS_REQUIRED_NO.search(self._head)),
        )


def header_section(data: bytes) -> bytes:
    """The header of a message (LF form) that starts with ``data``: up to and
    excluding the empty line, at most MAX_HEADER_COPY bytes, ending in LF."""
    if data.startswith(b"\n"):
        return b""
    end = data.find(b"\n\n")
    head = data[: end + 1] if end >= 0 else data
    if len(head) > MAX_HEADER_COPY:
        head = head[:MAX_HEADER_COPY]
        head = head[: head.rfind(b"\n") + 1]
    elif not head.endswith(b"\n"):
        head += b"\n"
    return head
