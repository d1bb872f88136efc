"""IMAP folder names <-> Maildir++ directory names, as Dovecot lays them out.

The user's Maildir is INBOX; every other folder is a directory directly in
it, named "." + its levels joined by "." in modified UTF-7 (Dovecot's
default, ``mailbox_list_utf8 = no``): "Work" / "Projects" is
``.Work.Projects/``, "Entwürfe" is ``.Entw&APw-rfe/``.

**Separator.**  The hierarchy separator clients see is "." (``SEPARATOR``),
Dovecot's default for Maildir++ (its namespace ``separator`` left empty takes
the layout's own, ``list->sep = '.'`` in mailbox-list-maildir.c): a scripted
session gets the same LIST answers from both servers, and the name a client
sees is the name on disk.  ``parse`` also takes "/" for a site whose Dovecot
sets ``separator = /``; either way a level may contain neither "." nor "/",
so both separators map to one directory and nothing needs escaping.

**Refusals** (the house rule: no path from client input unchecked).  Every
name is checked here before any path is built: no empty level (so no
leading, trailing or doubled separator, and no ".." component), no "/" or
"." inside a level, no control characters (C0, DEL, C1), no lone
surrogates, no list wildcards "*" and "%" (RFC 9051 §6.3.9 could not match
them literally), at most ``MAX_LEVELS`` levels and ``NAME_MAX`` octets for
the directory name.  ``folder_path`` checks again that the result is one
component directly inside the Maildir.  INBOX is case-insensitive (RFC 9051
§5.1) and always spelled "INBOX".
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from postoffice.mail import mutf7

INBOX = "INBOX"
SEPARATOR = "."  # what LIST shows (see above)
DISK_SEPARATOR = "."  # Maildir++: fixed by the layout
MAX_LEVELS = 16  # Dovecot's MAILBOX_MAX_HIERARCHY_LEVELS
NAME_MAX = 255  # octets in one directory name (Linux NAME_MAX)
_ALLOWED_SEPARATORS = (".", "/")
_REFUSED = frozenset("./*%")


class FolderNameError(ValueError):
    """A folder name that may not be used; the text is safe to show a client."""


@dataclass(frozen=True, slots=True)
class FolderName:
    """A checked folder name: its levels, INBOX spelled canonically."""

    levels: tuple[str, ...]

    @property
    def is_inbox(self) -> bool:
        return self.levels == (INBOX,)

    def imap(self, separator: str = SEPARATOR) -> str:
        """The name as LIST shows it (Unicode; the protocol layer encodes it
        in modified UTF-7 for rev1 clients)."""
        return separator.join(self.levels)

    @property
    def directory(self) -> str:
        """The Maildir++ directory name; "" for INBOX (the Maildir itself)."""
        if self.is_inbox:
            return ""
        return "." + DISK_SEPARATOR.join(mutf7.encode(level) for level in self.levels)

    @property
    def parent(self) -> FolderName | None:
        return FolderName(self.levels[:-1]) if len(self.levels) > 1 else None

    def is_under(self, other: FolderName) -> bool:
        """Whether this is a strict descendant of ``other``."""
        n = len(other.levels)
        return len(self.levels) > n and self.levels[:n] == other.levels

    def moved(self, old: FolderName, new: FolderName) -> FolderName:
        """This name with the prefix ``old`` replaced by ``new`` (RENAME of a parent)."""
        if not (self == old or self.is_under(old)):
            raise ValueError("not under the renamed folder")
        return FolderName(new.levels + self.levels[len(old.levels) :])


def parse(name: str, separator: str = SEPARATOR) -> FolderName:
    """Check a client's (Unicode) folder name; raise FolderNameError."""
    if separator not in _ALLOWED_SEPARATORS:
        raise ValueError(f"unsupported separator {separator!r}")
    if not name:
        raise FolderNameError("empty mailbox name")
    levels = name.split(separator)
    if len(levels) > MAX_LEVELS:
        raise FolderNameError("mailbox name too deep")
    if levels[0].upper() == INBOX:
        levels[0] = INBOX
    for level in levels:
        _check_level(level)
    folder = FolderName(tuple(levels))
    if len(folder.directory.encode("ascii")) > NAME_MAX:
        raise FolderNameError("mailbox name too long")
    return folder


def _check_level(level: str) -> None:
    if not level:
        raise FolderNameError("empty level in mailbox name")
    for ch in level:
        if ch in _REFUSED:
            raise FolderNameError(f"{ch!r} is not allowed in a mailbox name level")
        category = unicodedata.category(ch)
        if category == "Cc":  # C0, DEL and C1 controls
            raise FolderNameError("control character in mailbox name")
        if category == "Cs":
            raise FolderNameError("lone surrogate in mailbox name")


def from_directory(dirname: str) -> FolderName | None:
    """The folder a Maildir++ directory name holds, or None when the entry
    is no folder we may show: not "."-led, Dovecot's ``..DOVECOT-TRASHED``
    and other ".."-led names, non-canonical modified UTF-7 (which would
    alias another name), or anything ``parse`` refuses."""
    if not dirname.startswith(".") or dirname.startswith(".."):
        return None
    levels: list[str] = []
    for raw in dirname[1:].split(DISK_SEPARATOR):
        try:
            levels.append(mutf7.decode(raw))
        except mutf7.Mutf7Error:
            return None
    try:
        folder = parse(DISK_SEPARATOR.join(levels), DISK_SEPARATOR)
    except FolderNameError:
        return None
    # "inbox" on disk is not INBOX's directory: only one spelling is ours.
    return folder if folder.directory == dirname else None


def folder_path(maildir: Path, folder: FolderName) -> Path:
    """The Maildir of ``folder`` inside the user's ``maildir``."""
    dirname = folder.directory
    if not dirname:
        return maildir
    # Belt and braces: ``parse`` made this one "."-led component.
    if "/" in dirname or "\0" in dirname or dirname in (".", "..") or dirname.startswith(".."):
        raise FolderNameError("unsafe mailbox name")
    path = maildir / dirname
    if path.parent != maildir:
        raise FolderNameError("unsafe mailbox name")
    return path
