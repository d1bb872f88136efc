"""What a Sieve script sees of a message: a bounded, parsed view of it.

A script may test any header and the body (RFC 5173 :raw, :content,
:text), of a message an attacker wrote.  So the view is built from at most
HEADER_LIMIT + BODY_LIMIT octets (a stored file is read no further), MIME
parts are walked breadth first up to MAX_PARTS and MAX_DEPTH with at most
BODY_LIMIT of decoded text in all, and all of it is blocking work its
caller (delivery/sieve.py) runs in the executor, never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from pathlib import Path

from postoffice.mail.address import Address, AddressError, parse_address
from postoffice.protocol.sieve_run import SieveMessage
from postoffice.storage import folder_names
from postoffice.storage.folders import Folders

# What a script may read of a message: the header, and of the body this
# much (raw, and decoded text in all); a stored file is read no further,
# so a script costs at most this much parsing, in the executor.
BODY_LIMIT = 256 * 1024
HEADER_LIMIT = 128 * 1024
MAX_PARTS = 64  # MIME parts body :content looks at (RFC 5173 §5.2)
MAX_DEPTH = 8  # of nested multiparts
_SPAMD_SCORE = re.compile(r"\[\s*(-?[0-9.]+)\s*/")


@dataclass(frozen=True, slots=True)
class LoadedMessage:
    """One delivered message as scripts see it, parsed once for all its
    mailboxes, plus what replies and redirects need."""

    headers: tuple[tuple[str, str], ...]
    size: int  # of the message, our Return-Path line not counted
    body_text: str
    body_raw: str
    body_parts: tuple[tuple[str, str], ...]
    head: bytes  # the message (without our Return-Path line), at most what was parsed
    content: bytes | None  # the stored content from ``offset`` on is the message, when in memory
    path: Path | None  # else the stored file, the message from ``offset`` on
    offset: int
    sender: Address | None
    parsed: EmailMessage


def spam_score(headers: Sequence[tuple[str, str]]) -> float | None:
    """rspamd's score: X-Spamd-Result "default: False [3.40 / 15.00]", or X-Spam-Score."""
    for name, value in headers:
        lowered = name.lower()
        try:
            if lowered == "x-spamd-result":
                found = _SPAMD_SCORE.search(value)
                if found:
                    return float(found.group(1))
            elif lowered == "x-spam-score":
                return float(value.strip().split()[0])
        except (ValueError, IndexError):
            continue
    return None


def read_stored(path: Path) -> tuple[bytes, int]:
    """Blocking: the start of a stored file (as much as a script may see) and its size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return f.read(HEADER_LIMIT + BODY_LIMIT + 1024), size


def _strip_prefix(data: bytes, ours: Address | None) -> tuple[Address | None, int]:
    """The envelope sender our Return-Path names, and where the message
    proper starts (after it and the session's own Delivered-To)."""
    sender: Address | None = None
    offset = 0
    if data.startswith(b"Return-Path:"):
        line = data[: data.find(b"\n") + 1 or len(data)]
        offset = len(line)
        text = line.split(b":", 1)[1].strip().strip(b"<>").decode("utf-8", "replace")
        with contextlib.suppress(AddressError):
            sender = parse_address(text, utf8=True) if text else None
    # The SMTP session's own Delivered-To (one mailbox): not the message's, so
    # a redirect's loop check (which looks for this mailbox) does not see it.
    line = f"Delivered-To: {ours}\n".encode()
    if ours is not None and data.startswith(line, offset):
        offset += len(line)
    return sender, offset


def _decoded(part: Message) -> str:
    """A leaf part's content, transfer encoding undone, text in its charset."""
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:  # an unknown charset name
        return data.decode("utf-8", "replace")


def _body_parts(message: Message) -> tuple[tuple[str, str], ...]:
    """RFC 5173 §5.2: each MIME part's type and what :content tests of it
    (a leaf's decoded content, a multipart's prologue and epilogue, a
    message/rfc822's header), breadth first, bounded in count, depth and text."""
    out: list[tuple[str, str]] = []
    budget = BODY_LIMIT
    pending: list[tuple[Message, int]] = [(message, 0)]
    while pending and len(out) < MAX_PARTS and budget > 0:
        part, depth = pending.pop(0)
        ctype = part.get_content_type().lower()
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            text = (part.preamble or "") + (part.epilogue or "")
            if depth < MAX_DEPTH:
                pending.extend((p, depth + 1) for p in payload if isinstance(p, Message))
            if ctype == "message/rfc822":
                nested = payload[0] if payload and isinstance(payload[0], Message) else None
                text = "".join(f"{k}: {v}\n" for k, v in nested.items()) if nested else ""
        else:
            text = _decoded(part)
        text = text[:budget]
        budget -= len(text)
        out.append((ctype, text))
    return tuple(out)


def load_message(
    data: bytes,
    ours: Address | None,
    *,
    size: int | None = None,
    path: Path | None = None,
    wants_body: bool = True,
) -> LoadedMessage:
    """Blocking (it parses): ``data`` is the stored content, whole (held in
    memory) or its start (``path``'s first bytes, the file ``size`` long);
    ``ours``: the one mailbox whose Delivered-To the SMTP session put on top."""
    sender, offset = _strip_prefix(data, ours)
    head = data[offset : offset + HEADER_LIMIT + BODY_LIMIT]
    parsed = message_from_bytes(head, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    headers = tuple((k, str(v)) for k, v in parsed.items())
    raw_body, text = "", ""
    parts: tuple[tuple[str, str], ...] = ()
    if wants_body:
        end = head.find(b"\n\n")
        raw_body = head[end + 2 :][:BODY_LIMIT].decode("utf-8", "replace") if end >= 0 else ""
        with contextlib.suppress(Exception):  # a broken MIME structure: no parts
            parts = _body_parts(parsed)
        text = "\n".join(t for ctype, t in parts if ctype.startswith("text/"))
    return LoadedMessage(
        headers=headers,
        size=(len(data) if size is None else size) - offset,
        body_text=text,
        body_raw=raw_body,
        body_parts=parts,
        head=head,
        content=data if path is None else None,
        path=path,
        offset=offset,
        sender=sender,
        parsed=parsed,
    )


def sieve_message(loaded: LoadedMessage, original: Address, maildir: Path) -> SieveMessage:
    """What one mailbox's script sees: ``original`` is its RCPT TO address."""
    folders = Folders(maildir)

    def exists(name: str) -> bool:
        try:
            folder = parse_folder(name)
        except folder_names.FolderNameError:
            return False
        return folder.is_inbox or folders.exists(folder)

    return SieveMessage(
        headers=loaded.headers,
        size=loaded.size,
        envelope_from=str(loaded.sender) if loaded.sender else "",
        envelope_to=str(original),
        body_text=loaded.body_text,
        body_raw=loaded.body_raw,
        body_parts=loaded.body_parts,
        spam_score=spam_score(loaded.headers),
        now=time.time(),
        mailbox_exists=exists,
    )


def parse_folder(name: str) -> folder_names.FolderName:
    """A fileinto name as IMAP names it (our "." separator); "/" is taken
    too, the separator scripts written for other servers use."""
    try:
        return folder_names.parse(name)
    except folder_names.FolderNameError:
        if "/" not in name:
            raise
        return folder_names.parse(name, "/")
