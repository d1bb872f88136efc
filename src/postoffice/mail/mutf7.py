"""Modified UTF-7 (RFC 3501 §5.1.3): mailbox names as IMAP4rev1 sends them
and as Dovecot stores Maildir++ folder names on disk.

Shared by both layers that need it: the IMAP protocol core (a rev1 client
names mailboxes in modified UTF-7; RFC 9051 §5.1 and RFC 6855 use UTF-8)
and storage (Dovecot's default ``mailbox_list_utf8 = no`` keeps directory
names in modified UTF-7, so ``.Entw&APw-rfe`` is the folder "Entwürfe").

Written by hand, 60 lines: the maintained implementations live inside IMAP
client libraries (imapclient's ``imap_utf7``), whose decoders accept
non-canonical forms.  Ours refuses them (RFC 3501 §5.1.3: printable ASCII
"MUST" stand for itself, "&" is only ever "&-", base64 runs are minimal and
never adjacent), so one name has exactly one encoding: two different
directory names can never decode to the same folder.
"""

from __future__ import annotations

import base64
import binascii
import re

_B64_RUN = re.compile(r"&([A-Za-z0-9+,]*)-")


class Mutf7Error(ValueError):
    """Not canonical modified UTF-7."""


def _direct(ch: str) -> bool:
    """Printable US-ASCII (0x20-0x7E) represents itself (RFC 3501 §5.1.3)."""
    return " " <= ch <= "~"


def encode(text: str) -> str:
    """``text`` in modified UTF-7.  Raise Mutf7Error for a lone surrogate
    (no UTF-16 form)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            try:
                raw = "".join(pending).encode("utf-16-be")
            except UnicodeEncodeError:
                raise Mutf7Error("a lone surrogate has no UTF-16 form") from None
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append(f"&{b64}-")
            pending.clear()

    for ch in text:
        if _direct(ch):
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode(text: str) -> str:
    """The Unicode name ``text`` encodes; Mutf7Error unless it is exactly
    what ``encode`` gives for it (the canonical form)."""
    out: list[str] = []
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if ch != "&":
            if not _direct(ch):
                raise Mutf7Error("only printable ASCII may appear outside a base64 run")
            out.append(ch)
            pos += 1
            continue
        m = _B64_RUN.match(text, pos)
        if m is None:
            raise Mutf7Error("unterminated or malformed '&' run")
        run = m[1]
        pos = m.end()
        if not run:
            out.append("&")
            continue
        out.append(_decode_run(run))
    result = "".join(out)
    # One rule refuses every other non-canonical spelling: adjacent runs,
    # non-zero padding bits, "&AGE-" for "a".
    if encode(result) != text:
        raise Mutf7Error("not the canonical encoding")
    return result


def _decode_run(run: str) -> str:
    padded = run.replace(",", "/") + "=" * (-len(run) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise Mutf7Error("bad base64 in a run") from None
    if len(raw) % 2:
        raise Mutf7Error("a run is not whole UTF-16 units")
    try:
        decoded = raw.decode("utf-16-be")
    except UnicodeDecodeError:
        raise Mutf7Error("a run is not valid UTF-16") from None
    if any(_direct(ch) for ch in decoded):
        raise Mutf7Error("printable ASCII encoded in a run")
    return decoded
