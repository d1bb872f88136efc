"""IMAP mailbox names on the wire: modified UTF-7 (rev1) and UTF-8 (rev2).

IMAP4rev1 clients send and expect mailbox names in modified UTF-7 (RFC 3501
§5.1.3); IMAP4rev2 (RFC 9051 §5.1) and clients that ENABLE UTF8=ACCEPT
(RFC 6855 §3) use UTF-8.  Python's "utf-7" codec is the RFC 2152 form
(``+`` shift, ``/`` in base64, optional shifts of printable ASCII), which is
not this one, so the conversion is written here, strictly: a name that has
two spellings would be two mailboxes to a client and one to us, so only the
canonical spelling decodes.
"""

from __future__ import annotations

import base64
import binascii

INBOX = "INBOX"


class MailboxNameError(ValueError):
    """A name that is not valid modified UTF-7; the message is safe to send."""


def _direct(ch: str) -> bool:
    # RFC 3501 §5.1.3: printable US-ASCII except "&" represents itself.
    return "\x20" <= ch <= "\x7e" and ch != "&"


def encode_mutf7(name: str) -> str:
    """``name`` in modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be", "surrogatepass")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            run.clear()

    for ch in name:
        if _direct(ch):
            flush()
            out.append(ch)
        elif ch == "&":
            flush()
            out.append("&-")
        else:
            run.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(text: str) -> str:
    """The Unicode name ``text`` spells in modified UTF-7; MailboxNameError
    for anything but the canonical spelling (RFC 3501 §5.1.3: printable
    ASCII is never encoded, runs are maximal, base64 has no padding)."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if not ("\x20" <= ch <= "\x7e"):
            raise MailboxNameError("Mailbox name is not modified UTF-7")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise MailboxNameError("Unterminated shift in mailbox name")
        chunk = text[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        out.append(_decode_run(chunk))
    result = "".join(out)
    # Two adjacent runs, encoded ASCII or padding bits would all decode, but
    # re-encode differently: only the canonical spelling is taken.
    if encode_mutf7(result) != text:
        raise MailboxNameError("Mailbox name is not in canonical modified UTF-7")
    return result


def _decode_run(chunk: str) -> str:
    if any(c not in _B64 for c in chunk) or len(chunk) % 4 == 1:
        raise MailboxNameError("Bad base64 in mailbox name")
    padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except binascii.Error as exc:
        raise MailboxNameError("Bad base64 in mailbox name") from exc
    if len(raw) % 2:
        raise MailboxNameError("Bad UTF-16 in mailbox name")
    try:
        return raw.decode("utf-16-be")
    except UnicodeDecodeError as exc:
        raise MailboxNameError("Bad UTF-16 in mailbox name") from exc


_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def normalize_mailbox(name: str) -> str:
    """INBOX in any case is INBOX (RFC 9051 §5.1); other names are kept."""
    return INBOX if name.upper() == INBOX else name


def valid_utf8_name(name: str) -> bool:
    """RFC 9051 §5.1 / RFC 6855 §3: no control characters in a UTF-8 name
    (RFC 5198's Net-Unicode: no C0/C1 controls, no U+2028/2029)."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in name)
