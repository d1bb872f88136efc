"""Long lines on their way out: fold them to the 998 octets SMTP allows.

RFC 5322 §2.1.1 and RFC 5321 §4.5.3.1.6 limit a line to 998 octets (1000
with CRLF).  Badly written programs send longer ones, so postoffice accepts
lines up to ``[limits] max_line_length`` and keeps them whole in local
mailboxes (as Postfix does).  Mail that enters the outbound queue is folded
here first, so the queue holds what goes on the wire and DKIM signs exactly
that (policy/dkim_sign.py signs the queued form).

The rule is Postfix's ``smtp_line_length_limit`` (src/smtp/smtp_proto.c,
``smtp_text_out``): after every 998 octets of a line, insert a line break
and a SPACE; the space counts towards the next piece, so no piece is longer
than 998 octets.  Like Postfix, the break falls at exactly that octet, not
at the last whitespace: the leading space makes a header piece a
continuation line (RFC 5322 §2.2.3) and does the least damage to MIME
bodies (base64 decoders skip it).  A line of exactly 998 octets is left
alone.  Content is in LF form here (the SMTP client makes CRLF), and the
dot that transparency adds on the wire is not counted (§4.5.3.1.6).
"""

from __future__ import annotations

SMTP_LINE_LIMIT = 998  # octets, without the line ending (RFC 5321 §4.5.3.1.6)
_BREAK = b"\n "


class LineFolder:
    """Folds LF-form content fed in any chunking; output does not depend on it.

    ``feed`` returns its input unchanged (the same object, no copy) when no
    line in it needs folding, which is the usual case.
    """

    __slots__ = ("_column", "_limit")

    def __init__(self, limit: int = SMTP_LINE_LIMIT) -> None:
        if limit < 2:
            raise ValueError("a folded piece needs room for the space and one octet")
        self._limit = limit
        self._column = 0  # octets of the current output line so far

    def feed(self, data: bytes) -> bytes:
        limit = self._limit
        column = self._column
        pieces: list[bytes] | None = None
        start = 0  # data[start:pos] is not yet in ``pieces``
        pos = 0
        n = len(data)
        # Jump from line end to line end with rfind (C speed): each step
        # covers up to ``limit`` octets, so this is a few Python steps per
        # kilobyte rather than one per line.
        while pos < n:
            room = limit - column
            last = data.rfind(b"\n", pos, pos + room + 1)
            if last >= 0:
                pos, column = last + 1, 0
            elif n - pos <= room:
                column += n - pos
                pos = n
            else:  # the line goes on past the limit: break it there
                cut = pos + room
                if pieces is None:
                    pieces = []
                pieces.append(data[start:cut])
                pieces.append(_BREAK)
                start = pos = cut
                column = 1  # the space
        self._column = column
        if pieces is None:
            return data
        pieces.append(data[start:])
        return b"".join(pieces)
