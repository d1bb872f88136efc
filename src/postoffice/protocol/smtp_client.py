"""The SMTP client core, sans I/O: replies in, commands out.

The client side's counterpart of ``smtp_server``: nothing here touches a
socket or a clock, so every rule is tested with bytes.  Replies follow RFC
5321 §4.2 (``ddd-text`` continuation lines, ``ddd text`` last line) and are
the same ``Reply`` the server writes, as received (enhanced status codes,
RFC 3463 / RFC 2034, read by ``Reply.enhanced``).  The message body goes
out through the one dot-stuffer, ``dotstuff.DotStuffer`` (RFC 5321 §4.5.2),
chunk by chunk, so a message is never held whole in memory.  The I/O side
is ``delivery/smtp_connection.py``.
"""

from __future__ import annotations

import re

from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn
from postoffice.protocol.errors import RemoteProtocolError
from postoffice.protocol.smtp_reply import Reply

MAX_REPLY_LINE = 8192  # RFC 5321 §4.5.3.1.5 says 512; be lenient, but bounded
MAX_REPLY_LINES = 200  # an EHLO reply with more lines than this is hostile
_FORBIDDEN_IN_COMMAND = re.compile(r"[\x00-\x1f\x7f]")


class ReplyParser:
    """Feed bytes, get complete replies.  Lines end in CRLF (a bare LF is
    tolerated, as most clients do)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished reply are buffered."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise RemoteProtocolError("reply line too long")
                return replies
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) > MAX_REPLY_LINE:
            raise RemoteProtocolError("reply line too long")
        if len(raw) < 3 or not raw[:3].isdigit() or (len(raw) > 3 and raw[3:4] not in b" -"):
            raise RemoteProtocolError(f"malformed reply line {raw[:40]!r}")
        code = int(raw[:3])
        if not 200 <= code <= 599:
            raise RemoteProtocolError(f"reply code {code} out of range")
        if self._code is not None and code != self._code:
            raise RemoteProtocolError("reply code changed inside a multiline reply")
        self._code = code
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise RemoteProtocolError("reply has too many lines")
        if raw[3:4] == b"-":
            return None
        reply = Reply.received(code, tuple(self._lines))
        self._lines = []
        self._code = None
        return reply


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters (RFC 5321 §4.1.1.1);
    the first line is the greeting and is skipped."""
    # The text as received, not ``lines`` (sanitised for writing): a keyword
    # with a control character in it is no keyword we know.
    lines = reply.raw_lines
    extensions: dict[str, str] = {}
    for line in lines[1:]:
        keyword, _sep, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def format_path(address: Address | None) -> str:
    """``<local@domain>``, or ``<>`` for the null reverse-path."""
    return "<>" if address is None else f"<{address}>"


def command(text: str) -> bytes:
    """One command line.  Refuses control characters so no address or
    parameter can inject a second command."""
    if _FORBIDDEN_IN_COMMAND.search(text):
        raise ValueError("control character in SMTP command")
    return text.encode("utf-8") + b"\r\n"


def mail_command(
    sender: Address | None,
    *,
    size: int | None,
    body_8bit: bool,
    smtputf8: bool,
    dsn: MessageDsn | None = None,
    requiretls: bool = False,
) -> bytes:
    """``dsn``: RET and ENVID, only for a peer that offers DSN (RFC 3461 §5.2);
    ``requiretls``: only for a peer that offers REQUIRETLS (RFC 8689 §4.2.1)."""
    params = [f"MAIL FROM:{format_path(sender)}"]
    if size is not None:
        params.append(f"SIZE={size}")  # RFC 1870 §6
    if body_8bit:
        params.append("BODY=8BITMIME")  # RFC 6152 §2
    if smtputf8:
        params.append("SMTPUTF8")  # RFC 6531 §3.4
    if dsn is not None:
        params += dsn.mail_params()
    if requiretls:
        params.append("REQUIRETLS")
    return command(" ".join(params))


def rcpt_command(recipient: Address, dsn: RecipientDsn | None = None) -> bytes:
    """``dsn``: NOTIFY and ORCPT, only for a peer that offers DSN (RFC 3461 §5.2)."""
    params = [] if dsn is None else dsn.rcpt_params()
    return command(" ".join([f"RCPT TO:{format_path(recipient)}", *params]))
