"""SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463).

One ``Reply`` for both sides: the server core sends them, the client core
(``smtp_client.ReplyParser``) reads them from a peer.

A ``Reply`` the server writes has its enhanced status code apart
(``Reply(550, "no such user", "5.1.1")``) and ``to_bytes`` puts it before
every line.  A reply as received keeps its text as the peer sent it, its
enhanced codes included (``Reply.received``), so nothing of what the peer
said is lost in logs and bounces; ``enhanced`` reads the code either way.

``to_bytes`` is the only place that turns a reply into wire format, so it
is the one place that guarantees a reply can never inject extra lines: CR,
LF and other control characters in the text are replaced by spaces (text
may come from a peer, e.g. an error message that quotes an address).  It is
also where replies stay ASCII: RFC 5321 §2.4 allows only US-ASCII in reply
text (RFC 6531 asks nothing else of a server), so any other character, e.g.
in a quoted UTF-8 address, goes out as "?".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Control characters that must never reach the wire inside a reply line;
# tab is allowed by RFC 5321's textstring (HT / SP / %d33-126).
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# An enhanced code leading a line of received text: class, subject, detail.
_LEADING_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, one or more lines of text.

    The third argument is the RFC 3463 status code (``"2.1.0"``) to write
    after the code on every line, as RFC 2034 §4 requires; read it (or the
    one a received reply carries in its text) as ``enhanced``.
    """

    code: int
    text: str | tuple[str, ...]
    _enhanced: str | None = None

    def __post_init__(self) -> None:
        # RFC 5321 §4.2: the first digit is 2-5, the second 0-5.
        if not (200 <= self.code <= 599) or (self.code // 10) % 10 > 5:
            raise ValueError(f"invalid SMTP reply code {self.code}")
        if self._enhanced is not None and not _ENHANCED.fullmatch(self._enhanced):
            raise ValueError(f"invalid enhanced status code {self._enhanced!r}")

    @classmethod
    def received(cls, code: int, lines: tuple[str, ...]) -> Reply:
        """A reply as a peer sent it: ``lines`` are the texts after ``ddd-``
        and ``ddd `` (enhanced codes included).  Only the first digit of
        ``code`` is checked (2-5): a client acts on it ("a receiver-SMTP
        SHOULD test the first digit", RFC 5321 §4.2), so a code in a category
        we may not send ourselves (x6z-x9z) is still read."""
        if not 200 <= code <= 599:
            raise ValueError(f"invalid SMTP reply code {code}")
        reply = object.__new__(cls)
        object.__setattr__(reply, "code", code)
        object.__setattr__(reply, "text", lines)
        object.__setattr__(reply, "_enhanced", None)
        return reply

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code: the one given, else the one that leads
        the text's first line (a received reply) if its class agrees with
        the reply code."""
        if self._enhanced is not None:
            return self._enhanced
        raw = self.raw_lines
        m = _LEADING_ENHANCED.match(raw[0]) if raw else None
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return None

    @property
    def lines(self) -> tuple[str, ...]:
        """The text as lines, sanitised (never empty: at least one line)."""
        raw = self.raw_lines
        if not raw:
            raw = ("",)
        return tuple(_UNSAFE.sub(" ", line) for line in raw)

    @property
    def summary(self) -> str:
        """The reply as one line of text as it came, for logs and a DSN's
        Diagnostic-Code: ``550 5.1.1 no such user``."""
        prefix = "" if self._enhanced is None else f"{self._enhanced} "
        joined = " ".join(f"{prefix}{line}".strip() for line in self.raw_lines)
        return f"{self.code} " + joined.strip()

    @property
    def is_positive(self) -> bool:
        """2xx (completion) or 3xx (intermediate, e.g. 354 or 334)."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def raw_lines(self) -> tuple[str, ...]:
        """The text as given (ours) or as received (a peer's), one string a
        line; ``lines`` is the form sanitised for writing."""
        return (self.text,) if isinstance(self.text, str) else self.text

    def to_bytes(self) -> bytes:
        """The reply as written on the wire, CRLF-terminated, multi-line if needed."""
        return _wire(self)

    def _encode(self) -> bytes:
        lines = self.lines
        last = len(lines) - 1
        out: list[str] = []
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            if self._enhanced is not None:
                out.append(f"{self.code}{sep}{self._enhanced} {line}".rstrip(" ") + "\r\n")
            else:
                # Keep "334 " with its space even when the text is empty: some
                # SASL clients (RFC 4954 §4) expect it.
                out.append(f"{self.code}{sep}{line}\r\n")
        # RFC 5321 §2.4: replies are ASCII; a non-ASCII character (or a lone
        # surrogate from undecodable input) becomes "?".
        return "".join(out).encode("ascii", "replace")

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "replace").rstrip("\r\n")


@functools.lru_cache(maxsize=512)
def _wire(reply: Reply) -> bytes:
    # The same few replies answer every transaction: encode each once.
    return reply._encode()
