"""Dot-stuffing: stored message text -> the multi-line wire form, for SMTP and POP3.

The one encoder behind the SMTP client's DATA (RFC 5321 §4.5.2) and POP3's
RETR and TOP (RFC 1939 §3).  Both protocols send text as CRLF-terminated
lines, put one more "." before every line that begins with ".", and end
with a line holding only "." (``TERMINATOR``), so the receiver can never
mistake a line of the message for the end.

The line-ending rule, decided once for both:

* LF and CRLF each end a line and go out as CRLF.  Our Maildirs and queue
  store LF; other delivery agents may have stored CRLF.
* A CR not followed by LF does not end a line: it goes out as it is, and
  a "." after it is not at a line start, so it is not stuffed.  POP3 has
  always sent it so, and LIST/STAT count it so (``wire_size`` in
  ``pop3.py``, which agrees with Dovecot's ``W=`` size); the SMTP client
  never meets one, because our server refuses a bare CR in DATA (RFC 5321
  §2.3.8) and the queue holds only what it accepted.  The output still
  cannot contain CRLF "." CRLF before the terminator: every LF in it
  follows a CR, and every "." after a CRLF is doubled.

Speed matters (every POP3 RETR and every relayed message goes through
here): whole-chunk ``bytes.replace``, no Python loop per line, and no copy
of a chunk that has no line starting with ".".
"""

from __future__ import annotations

import re

TERMINATOR = b".\r\n"
# A line that starts with a dot.  re finds it about twice as fast as
# ``b"\r\n." in data`` (bytes search skips slowly over long lines).
_DOT_LINE = re.compile(rb"\r\n\.")


def _to_crlf(chunk: bytes, after_cr: bool = False) -> bytes:
    """LF -> CRLF for every LF not already after a CR (``after_cr``: the byte
    before ``chunk`` was CR).  A CR at the end is left for the caller."""
    if after_cr:
        chunk = b"\r" + chunk
    if b"\r" in chunk:  # rare in stored mail: LF is the Maildir norm
        chunk = chunk.replace(b"\r\n", b"\n")
    return chunk.replace(b"\n", b"\r\n")


def to_crlf(message: bytes) -> bytes:
    """A whole stored message in wire line form under the rule above (LF and
    CRLF -> CRLF, a bare CR kept): IMAP's BODY[] and RFC822.SIZE use it."""
    return _to_crlf(message)


def dot_stuff(data: bytes, at_line_start: bool) -> bytes:
    """``data`` (CRLF line endings) with one more "." before every line that
    starts with "."; ``at_line_start``: ``data`` begins a line."""
    # Lines starting with "." are rare: look before copying.
    out = data.replace(b"\r\n.", b"\r\n..") if _DOT_LINE.search(data) else data
    if at_line_start and out[:1] == b".":
        out = b"." + out
    return out


class DotStuffer:
    """Stored message text -> wire form, streamed: ``feed`` any chunking of
    the message, then ``finish`` for the end of the last line and
    ``TERMINATOR``.

    Chunks may split anywhere, even between CR and LF: a trailing CR is held
    back until the next chunk shows whether an LF follows.  ``unstuffed``
    counts the octets of message sent, stuffed dots and the terminator not
    included: for a whole message it is ``wire_size`` (POP3's LIST size).
    """

    __slots__ = ("_dots", "_held_cr", "_line_start", "unstuffed")

    def __init__(self, *, dots: bool = True) -> None:
        """``dots`` False: the same line endings without dot-stuffing or
        terminator, for BDAT (RFC 3030 §2: the count, not a dot, ends it)."""
        self._dots = dots
        self._held_cr = False
        self._line_start = True  # the last byte sent ended a line (or nothing sent)
        self.unstuffed = 0

    def feed(self, chunk: bytes) -> bytes:
        return self._stuff(self._crlf(chunk))

    def finish(self) -> bytes:
        """The rest of the message, a final CRLF if it lacked one, and ``.CRLF``."""
        tail = b"\r" if self._held_cr else b""
        self._held_cr = False
        out = self._stuff(tail)
        if not self._line_start:
            out += b"\r\n"
            self.unstuffed += 2
        return out + TERMINATOR if self._dots else out

    def _crlf(self, chunk: bytes) -> bytes:
        """``chunk`` with CRLF line endings, a trailing CR held back."""
        data = _to_crlf(chunk, self._held_cr)
        self._held_cr = data.endswith(b"\r")
        return data[:-1] if self._held_cr else data

    def _stuff(self, data: bytes) -> bytes:
        """Dot-stuff ``data`` (from ``_crlf``) and count it as sent."""
        if not data:
            return data
        self.unstuffed += len(data)
        out = dot_stuff(data, self._line_start) if self._dots else data
        self._line_start = out.endswith(b"\n")
        return out
