"""Applying filter modifications to a spooled message's header and envelope.

Why apart from the session: what a modification means (which field an
occurrence names, where an insert goes, what a redirect replaces, when a
message counts as spam) is pure data work, tested on its own; the session
module (net/smtp_filtering.py) only streams files and opens writers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from postoffice.filters.verdicts import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    DeliverToFolder,
    Modification,
    Redirect,
    ReplaceBody,
)

# RFC 5322 §3.6.8 field name: printable ASCII but colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# rspamd's milter headers (its "milter_headers" module) and common X-Spam.
SPAM_ACTIONS = frozenset({"add header", "rewrite subject"})
HEADER_READ = 512 * 1024  # octets read to find the header block (it is bounded before)


class ModificationError(ValueError):
    """A filter asked for something malformed (a bad field name); logged and skipped."""


def split_header(head: bytes) -> tuple[list[tuple[str, str]], int]:
    """Parse the start of a stored message (LF form): its fields as (name,
    value) and the offset of the body (after the blank line; the length of
    ``head`` when none was found: all header)."""
    end = head.find(b"\n\n")
    if head.startswith(b"\n"):
        block, body_offset = b"", 1
    elif end < 0:
        block, body_offset = head, len(head)
    else:
        block, body_offset = head[: end + 1], end + 2
    fields: list[tuple[str, str]] = []
    for line in block.decode("utf-8", "surrogateescape").split("\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value}\n{line}")
            continue
        name, colon, value = line.partition(":")
        if not colon:
            continue  # not a field (it was stored as received; nothing to keep it by)
        fields.append((name.rstrip(" \t"), value[1:] if value.startswith(" ") else value))
    return fields, body_offset


def _clean_value(value: str) -> str:
    """LF line ends, and every continuation line folded (starts with
    whitespace): a value can never start a field of its own."""
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(
        [lines[0]] + [ln if ln[:1] in (" ", "\t") else f"\t{ln}" for ln in lines[1:] if ln.strip()]
    )


def _check_name(name: str) -> str:
    if not _FIELD_NAME.fullmatch(name):
        raise ModificationError(f"bad header field name {name!r}")
    return name


def edit_headers(
    fields: list[tuple[str, str]], mods: tuple[Modification, ...]
) -> list[tuple[str, str]]:
    """The header fields after the AddHeader and ChangeHeader modifications,
    in order (milter semantics: see verdicts.AddHeader/ChangeHeader)."""
    out = list(fields)
    for mod in mods:
        if isinstance(mod, AddHeader):
            entry = (_check_name(mod.name), _clean_value(mod.value))
            if mod.index is None or mod.index >= len(out):
                out.append(entry)
            else:
                out.insert(max(0, mod.index), entry)
        elif isinstance(mod, ChangeHeader):
            name = _check_name(mod.name)
            key = name.lower()
            seen = 0
            for i, (n, _v) in enumerate(out):
                if n.lower() == key:
                    seen += 1
                    if seen == mod.occurrence:
                        if mod.value:
                            out[i] = (n, _clean_value(mod.value))
                        else:
                            del out[i]
                        break
            else:
                if mod.value:
                    out.append((name, _clean_value(mod.value)))
    return out


def render_headers(fields: list[tuple[str, str]]) -> bytes:
    """The header block in stored form, with the blank line that ends it."""
    text = "".join(
        f"{n}: {v}\n" if not v.startswith(("\n", "\t")) else f"{n}:{v}\n" for n, v in fields
    )
    return text.encode("utf-8", "surrogateescape") + b"\n"


@dataclass
class EnvelopeEdit:
    """The envelope after the modifications: sender and recipients as text
    (parsed and resolved by the session as MAIL/RCPT would)."""

    sender: str | None  # None: unchanged
    sender_args: str = ""
    recipients: list[str] = field(default_factory=list)
    added: set[str] = field(default_factory=set)  # lower-cased: added by a filter
    folder: str = ""  # DeliverToFolder's, "" none
    body: bytes | Path | None = None  # ReplaceBody's; None keeps the spooled one


def edit_envelope(recipients: list[str], mods: tuple[Modification, ...]) -> EnvelopeEdit:
    edit = EnvelopeEdit(sender=None, recipients=list(recipients))
    for mod in mods:
        match mod:
            case AddRecipient(address=a):
                if a.lower() not in {r.lower() for r in edit.recipients}:
                    edit.recipients.append(a)
                    edit.added.add(a.lower())
            case DeleteRecipient(address=a):
                edit.recipients = [r for r in edit.recipients if r.lower() != a.lower()]
            case Redirect(addresses=addresses):
                edit.recipients = list(dict.fromkeys(addresses))
                edit.added |= {a.lower() for a in addresses}
            case ChangeSender(address=a, args=args):
                edit.sender, edit.sender_args = a, args
            case DeliverToFolder(folder=f):
                edit.folder = f
            case ReplaceBody(source=src):
                edit.body = src
    return edit


def is_spam(fields: list[tuple[str, str]]) -> bool:
    """What a spam filter says in the header: "X-Spam: Yes" (rspamd,
    SpamAssassin's X-Spam-Flag too) or rspamd's action header."""
    for name, value in fields:
        key, v = name.lower(), " ".join(value.split()).lower()
        if key in ("x-spam", "x-spam-flag") and v.startswith("yes"):
            return True
        if key == "x-spam-action" and v in SPAM_ACTIONS:
            return True
    return False
