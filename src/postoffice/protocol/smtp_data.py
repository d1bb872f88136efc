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

END_OF_DATA = b"\r\n.\r\n"
# Proper prefixes of END_OF_DATA, longest first: what may be held back.
_PARTIAL_ENDS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


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
        "_skip_virtual",
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

    def __init__(self, max_size: int, max_line: int = 998) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.bare_cr = False
        self.bare_lf = False
        self.line_too_long = False
        self.oversize = False
        self.done = False
        self._emitted = 0
        # The CRLF that ended the DATA command line starts the search window
        # (so ".\r\n" at once ends an empty message) but is not content.
        self._tail = b"\r\n"
        self._skip_virtual = True
        self._at_line_start = True
        self._line_len = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Consume ``data``; return (content to emit, remainder after the end or None).

        The remainder is whatever followed ``CR LF "." CR LF`` in ``data``
        (the next pipelined commands); it is ``None`` while the message goes
        on.  After the end, further calls return ``(b"", data)``.
        """
        if self.done:
            return b"", data
        buf = self._tail + data if self._tail else data
        end = buf.find(END_OF_DATA)
        if end >= 0:
            self.done = True
            self._tail = b""
            # The CRLF before the dot ends the last content line.
            return self._decode(buf[: end + 2]), buf[end + 5 :]
        held = 0
        for partial in _PARTIAL_ENDS:
            if buf.endswith(partial):
                held = len(partial)
                break
        if held:
            self._tail = buf[-held:]
            buf = buf[:-held]
        else:
            self._tail = b""
        return self._decode(buf), None

    def _decode(self, raw: bytes) -> bytes:
        """Decode one contiguous piece of raw content.

        Invariant: ``raw`` never ends in a CR whose LF is yet to come (a
        trailing CR is always held back), so every CRLF lies within one piece
        and a LF at the start of a piece is a bare LF.
        """
        if self._skip_virtual and raw:
            # Only the first non-empty piece starts with the virtual CRLF.
            self._skip_virtual = False
            raw = raw[2:]
        if not raw:
            return b""
        crlf = raw.count(b"\r\n")
        if not self.bare_cr and raw.count(b"\r") != crlf:
            self.bare_cr = True
        if not self.bare_lf and raw.count(b"\n") != crlf:
            self.bare_lf = True
        text = raw.replace(b"\r\n", b"\n") if crlf else raw
        if self._at_line_start and text[:1] == b".":
            text = text[1:]
        text = text.replace(b"\n.", b"\n")
        self._at_line_start = raw[-1:] == b"\n"
        self._check_lines(text)
        self.size += len(text)
        if self.oversize:
            return b""
        room = self.max_size - self._emitted
        if len(text) > room:
            self.oversize = True
            text = text[:room]
        self._emitted += len(text)
        return text

    def _check_lines(self, text: bytes) -> None:
        if self.line_too_long:
            return
        first = text.find(b"\n")
        if first < 0:
            self._line_len += len(text)
            if self._line_len > self.max_line:
                self.line_too_long = True
            return
        if self._line_len + first > self.max_line:
            self.line_too_long = True
            return
        last = text.rfind(b"\n")
        self._line_len = len(text) - last - 1
        # Only look at the lines in between if they could hold a long one.
        if self._line_len > self.max_line or (
            last - first > self.max_line
            and max(map(len, text[first + 1 : last].split(b"\n"))) > self.max_line
        ):
            self.line_too_long = True
