"""SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463).

A ``Reply`` is what the server says; ``to_bytes`` is the only place that
turns one into wire format, so it is the one place that guarantees a reply
can never inject extra lines: CR, LF and other control characters in the
text are replaced by spaces (text may come from a peer, e.g. an error
message that quotes an address).  It is also where replies stay ASCII:
RFC 5321 §2.4 allows only US-ASCII in reply text (RFC 6531 asks nothing
else of a server), so any other character, e.g. in a quoted UTF-8 address,
goes out as "?".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Control characters that must never reach the wire inside a reply line;
# tab is allowed by RFC 5321's textstring (HT / SP / %d33-126).
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, one or more lines of text.

    ``enhanced`` is the RFC 3463 status code (``"2.1.0"``); when set it is
    written after the code on every line, as RFC 2034 §4 requires.
    """

    code: int
    text: str | tuple[str, ...]
    enhanced: str | None = None

    def __post_init__(self) -> None:
        # RFC 5321 §4.2: the first digit is 2-5, the second 0-5.
        if not (200 <= self.code <= 599) or (self.code // 10) % 10 > 5:
            raise ValueError(f"invalid SMTP reply code {self.code}")
        if self.enhanced is not None and not _ENHANCED.fullmatch(self.enhanced):
            raise ValueError(f"invalid enhanced status code {self.enhanced!r}")

    @property
    def lines(self) -> tuple[str, ...]:
        """The text as lines, sanitised (never empty: at least one line)."""
        raw = (self.text,) if isinstance(self.text, str) else self.text
        if not raw:
            raw = ("",)
        return tuple(_UNSAFE.sub(" ", line) for line in raw)

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

    def to_bytes(self) -> bytes:
        """The reply as written on the wire, CRLF-terminated, multi-line if needed."""
        return _wire(self)

    def _encode(self) -> bytes:
        lines = self.lines
        last = len(lines) - 1
        out: list[str] = []
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            if self.enhanced is not None:
                out.append(f"{self.code}{sep}{self.enhanced} {line}".rstrip(" ") + "\r\n")
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
