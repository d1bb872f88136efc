"""A Maildir folder's files as the IMAP index's ``sync`` reads them.

``MaildirFolderFiles`` is the ``FolderFiles`` of one Maildir directory (the
INBOX root or a Maildir++ ``.Folder``): it lists new/ then cur/, stats the
files the index has not seen, looks again for files a listing missed, and
reads the ``:2,`` info letters as flags.  It blocks: ``sync`` runs in the
session's executor.

The info letters (Maildir spec, "info"; as Dovecot reads them): ``D`` draft,
``F`` flagged, ``R`` replied (\\Answered), ``S`` seen, ``T`` trashed
(\\Deleted); ``a``-``z`` are keywords numbered in the folder's keyword list
(Dovecot's ``dovecot-keywords``, which the folder layer reads and passes in).
``P`` (passed) has no IMAP flag and is ignored, as are unknown letters.

INTERNALDATE of a file first seen is its mtime: Dovecot's convention (its
APPEND sets the mtime to the INTERNALDATE with utime), so both servers give
the same date for the same file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from postoffice.storage.imap_index import FileFacts

_SYSTEM_LETTERS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
_LETTER_OF = {flag: letter for letter, flag in _SYSTEM_LETTERS.items()}


def info_flags(info: str, keywords: Sequence[str] = ()) -> frozenset[str]:
    """The flags ``info`` (the letters after ``:2,``) means."""
    flags: set[str] = set()
    for letter in info:
        system = _SYSTEM_LETTERS.get(letter)
        if system is not None:
            flags.add(system)
        elif "a" <= letter <= "z":
            number = ord(letter) - ord("a")
            if number < len(keywords):
                flags.add(keywords[number])
    return frozenset(flags)


def info_letters(flags: Collection[str], keywords: Sequence[str] = ()) -> str:
    """The ``:2,`` info for ``flags``, letters in ASCII order (Maildir spec);
    flags with no letter are left out (the index keeps them)."""
    letters = {_LETTER_OF[f] for f in flags if f in _LETTER_OF}
    for number, keyword in enumerate(keywords[:26]):
        if keyword in flags:
            letters.add(chr(ord("a") + number))
    return "".join(sorted(letters))


def _stem(name: str) -> str:
    return name.partition(":2,")[0]


class MaildirFolderFiles:
    """``FolderFiles`` for the Maildir at ``path``."""

    def __init__(self, path: Path, keywords: Sequence[str] = ()) -> None:
        self.path = path
        self._root = os.fspath(path)
        self._keywords = tuple(keywords)

    def _list(self) -> Iterator[str]:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError), os.scandir(f"{self._root}/{sub}") as it:
                for entry in it:
                    # Names starting with "." are temporary or hidden (Maildir spec).
                    if not entry.name.startswith("."):
                        yield entry.name

    def names(self) -> list[str]:
        return list(self._list())

    def facts(self, name: str) -> FileFacts | None:
        first, second = ("cur", "new") if ":2," in name else ("new", "cur")
        for sub in (first, second):
            try:
                st = os.stat(f"{self._root}/{sub}/{name}")
            except FileNotFoundError:
                continue
            return FileFacts(size=st.st_size, internaldate=int(st.st_mtime))
        return None

    def gone(self, stems: Collection[str]) -> Collection[str]:
        missing = set(stems)
        for name in self._list():
            missing.discard(_stem(name))
        return missing

    def flags(self, info: str) -> frozenset[str]:
        return info_flags(info, self._keywords)
