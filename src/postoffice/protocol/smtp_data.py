"""The DATA decoder: message content after ``354``, up to ``<CRLF>.<CRLF>``.

RFC 5321 §4.1.1.4 and §4.5.2.  What this decoder does, in order:

* **End of data** is recognised ONLY as ``CR LF "." CR LF``.  The CRLF before
  the dot may be the one that ended the DATA command line itself, so an
  empty message is just ``.\\r\\n``.  ``\\n.\\r\\n``, ``\\r\\n.\\n``, ``\\n.\\n``,
  ``\\r.\\r`` and every other variant are ordinary content: treating them as
  an end while another MTA does not is SMTP smuggling (CVE-2023-51764,
  CVE-2023-51765, CVE-2023-51766).
* **Line endings**: CRLF becomes LF.  A bare LF also ends a line inside the
  content and is kept as LF (as Postfix's ``smtpd_forbid_bare_newline =
  normalize`` does); it sets ``bare_lf``.  A bare CR (not followed by LF) is
  kept as it is and sets ``bare_cr``: RFC 5321 §2.3.8 forbids it and the
  session refuses such messages.
* **Dot-unstuffing** (§4.5.2): a line that begins with "." loses that dot.
* **Limits**: a line longer than ``max_line`` octets (after unstuffing,
  without its line ending; RFC 5322 §2.1.1 says 998) sets
  ``line_too_long``.  When the decoded size passes ``max_size`` the output
  stops (exactly ``max_size`` octets are emitted) and ``oversize`` is set,
  but the input is still consumed up to the end of data, so the session can
  answer 552 after the dot (RFC 1870 §6.2 asks servers not to cut the
  connection).

Speed matters: a message is decoded with whole-buffer ``bytes`` operations
(``find``, ``count``, ``replace``, ``split``), never a Python loop per line.
Between feeds only up to four bytes are held back: the longest tail of the
input that could still become ``CR LF "." CR LF``.
"""

from __future__ import annotations

import re

END_OF_DATA = b"\r\n.\r\n"
# Proper prefixes of END_OF_DATA, longest first: what may be held back.
_PARTIAL_ENDS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
_SLICE = 64 * 1024
_DOT_LINE_OR_BARE_CR = re.compile(rb"\r(?:\n\.|[^\n])")
_BARE_CR = re.compile(rb"\r[^\n]")
_LF_DOT = re.compile(rb"\n\.")


class DataDecoder:
    """Decode one message's DATA content; feed it bytes until it reports the end.

    Attributes, final once ``feed`` has returned a remainder:

    ``size``
        decoded octets of the whole message (LF line endings, unstuffed),
        counted even past ``max_size``;
    ``bare_cr``, ``bare_lf``, ``line_too_long``, ``oversize``
        as described in the module docstring;
    ``done``
        the end of data has been seen.
    """

    __slots__ = (
        "_at_line_start",
        "_emitted",
        "_line_len",
        "_newlines",
        "_skip_virtual",
        "_stuffed",
        "_tail",
        "bare_cr",
        "bare_lf",
        "done",
        "line_too_long",
        "max_line",
        "max_size",
        "oversize",
        "size",
    )

    def __init__(self, max_size: int, max_line: int = 998, *, dot_stuffed: bool = True) -> None:
        """``dot_stuffed`` False: BDAT content (RFC 3030), fed by ``feed_octets``."""
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.bare_cr = False
        self.bare_lf = False
        self.line_too_long = False
        self.oversize = False
        self.done = False
        self._emitted = 0
        self._newlines = 0  # LFs in what the current feed() returns
        # The CRLF that ended the DATA command line starts the search window
        # (so ".\r\n" at once ends an empty message) but is not content.
        self._stuffed = dot_stuffed
        self._tail = b"\r\n" if dot_stuffed else b""
        self._skip_virtual = dot_stuffed
        self._at_line_start = True
        self._line_len = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Consume ``data``; return (content to emit, remainder after the end or None).

        The remainder is whatever followed ``CR LF "." CR LF`` in ``data``
        (the next pipelined commands); it is ``None`` while the message goes
        on.  After the end, further calls return ``(b"", data)``.
        """
        self._newlines = 0
        if self.done:
            return b"", data
        if len(data) <= _SLICE:
            return self._feed(data)
        # Several passes run over each piece: keep pieces small enough to
        # stay in the CPU cache (measurably faster for megabyte feeds).
        out: list[bytes] = []
        for start in range(0, len(data), _SLICE):
            content, rest = self._feed(data[start : start + _SLICE])
            out.append(content)
            if rest is not None:
                return b"".join(out), rest + data[start + _SLICE :]
        return b"".join(out), None

    def feed_octets(self, data: bytes, final: bool) -> bytes:
        """Consume BDAT chunk content (RFC 3030 §2); return the content to emit.

        No dot-stuffing and no end marker: the count told where the chunk
        ends, and ``final`` says this is the last octet of the message (BDAT
        LAST).  Line endings, bare CR/LF, line length and size are judged as
        for DATA, so both paths store the same message.  A CR at the end of a
        feed is held back until the next, where its LF may be.
        """
        self._newlines = 0
        if self.done:
            return b""
        buf = self._tail + data if self._tail else data
        self._tail = b""
        if final:
            self.done = True
        elif buf.endswith(b"\r"):
            self._tail, buf = b"\r", buf[:-1]
        bare_cr = buf.endswith(b"\r") or _BARE_CR.search(buf) is not None
        return self._decode(buf, False, bare_cr)

    def _feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        buf = self._tail + data if self._tail else data
        # One C-speed scan finds the first line that starts with a dot (the
        # end of data is one) or the first bare CR, whichever comes first.
        # Without either, the piece is plain text and takes the fast path.
        first = _DOT_LINE_OR_BARE_CR.search(buf)
        end = -1
        if first is not None:
            end = buf.find(END_OF_DATA, first.start())
        if end >= 0:
            self.done = True
            self._tail = b""
            cut = end + 2  # the CRLF before the dot ends the last content line
            rest: bytes | None = buf[end + 5 :]
        else:
            held = 0
            for partial in _PARTIAL_ENDS:
                if buf.endswith(partial):
                    held = len(partial)
                    break
            cut = len(buf) - held
            self._tail = buf[cut:]
            rest = None
        piece = buf[:cut] if cut < len(buf) else buf
        if first is None:
            return self._decode(piece, False, False), rest
        at = first.start()
        if buf[at + 1] == 0x0A:  # "\r\n.": a dot line; a bare CR may follow it
            if at + 2 >= cut:  # that dot is held back or ends the data
                return self._decode(piece, False, False), rest
            # Search ``buf``, not ``piece``: a CR at the very end of the piece
            # is bare when the held-back byte after it is another CR.
            bare_cr = _BARE_CR.search(buf, at, cut + 1) is not None
            return self._decode(piece, True, bare_cr), rest
        # A bare CR comes first (unless it is in the commands after the end).
        return self._decode(piece, at < cut, at < cut), rest

    def _decode(self, raw: bytes, dot_lines: bool, bare_cr: bool) -> bytes:
        """Decode one contiguous piece of raw content.

        ``dot_lines``: a CRLF-started line in ``raw`` may begin with a dot;
        ``bare_cr``: ``raw`` holds a CR not followed by LF.  Invariant: ``raw``
        never ends in a CR whose LF is yet to come (a trailing CR is always
        held back; a piece may end in a CR only when the next byte is another
        CR), so every CRLF lies within one piece and a LF at the start of a
        piece is a bare LF.
        """
        if self._skip_virtual and raw:
            # Only the first non-empty piece starts with the virtual CRLF.
            self._skip_virtual = False
            raw = raw[2:]
        if not raw:
            return b""
        if bare_cr:
            self.bare_cr = True
            crlf = raw.count(b"\r\n")
            text = raw.replace(b"\r\n", b"\n")
            newlines = raw.count(b"\n")
        else:
            # Every CR is the first half of a CRLF: deleting CRs is CRLF -> LF.
            text = raw.replace(b"\r", b"")
            crlf = len(raw) - len(text)
            # (Faster than text.count: a one-byte replace runs at memchr speed.)
            newlines = len(text) - len(text.replace(b"\n", b""))
        if newlines != crlf:
            self.bare_lf = True
        if self._stuffed:
            if self._at_line_start and text[:1] == b".":
                text = text[1:]
            if dot_lines or self.bare_cr or self.bare_lf:
                text = _LF_DOT.sub(b"\n", text)
        self._at_line_start = raw[-1:] == b"\n"
        if not self.line_too_long:
            self._check_lines(text)
        self.size += len(text)
        if self.oversize:
            return b""
        room = self.max_size - self._emitted
        if len(text) > room:
            self.oversize = True
            text = text[:room]
            newlines = -(1 << 62)  # cut short: the count says nothing any more
        self._newlines += newlines
        self._emitted += len(text)
        return text

    @property
    def newlines(self) -> int:
        """LF octets in the content the last ``feed`` returned; -1 if unknown."""
        return self._newlines if self._newlines >= 0 else -1

    def _check_lines(self, text: bytes) -> None:
        """Set ``line_too_long`` if ``text`` (continuing the current line) has one.

        Jumps from line start to the last LF within ``max_line + 1`` octets
        (``rfind``, C speed): two jumps cover at least ``max_line`` octets, so
        this is a few Python steps per kilobyte, not one per line.
        """
        limit = self.max_line
        n = len(text)
        # The line in progress already has _line_len octets (at most limit).
        first = text.find(b"\n", 0, limit - self._line_len + 1)
        if first < 0:
            if n > limit - self._line_len:
                self.line_too_long = True
            else:
                self._line_len += n
            return
        pos = first + 1
        while n - pos > limit:
            last = text.rfind(b"\n", pos, pos + limit + 1)
            if last < 0:
                self.line_too_long = True
                return
            pos = last + 1
        last = text.rfind(b"\n", pos)
        self._line_len = n - (last + 1 if last >= 0 else pos)
