"""A Maildir folder's files as the IMAP index's ``sync`` reads them.

``MaildirFolderFiles`` is the ``FolderFiles`` of one Maildir directory (the
INBOX root or a Maildir++ ``.Folder``): it lists new/ then cur/, stats the
files the index has not seen, looks again for files a listing missed, and
reads the ``:2,`` info letters as flags.  It blocks: ``sync`` runs in the
session's executor.

The info letters are read by the one flags codec, ``storage/maildir_flags.py``
(system letters DFRST; ``a``-``z`` keywords from the folder's
``dovecot-keywords``, which the folder layer reads and passes in).

The listing token (``listing``) is the inode and mtime, in nanoseconds, of
new/ and cur/: every file added, removed or renamed there moves its
directory's mtime.  A directory changed in the last ``TRUSTED_AFTER``
seconds gives no token: the mtime clock ticks coarsely (the kernel's, a
few milliseconds), so a change in the same tick as the token would not move
it; after that margin a change must move it.

INTERNALDATE of a file is its mtime: Dovecot's convention (its
APPEND sets the mtime to the INTERNALDATE with utime), so both servers give
the same date for the same file.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Collection, Mapping
from pathlib import Path

from postoffice.storage.imap_index import FileFacts
from postoffice.storage.maildir_flags import info_flags, stem_of

TRUSTED_AFTER = 2.0  # seconds: see the module docstring
_DIGITS = re.compile(r"\d+")


def _named_size(name: str) -> int | None:
    # The info after ":2," is letters only: a ",S=" is the stem's.  find and
    # a match at its end, not a search: called for each file of a first sync.
    at = name.find(",S=")
    if at < 0:
        return None
    match = _DIGITS.match(name, at + 3)
    return int(match[0]) if match else None


class MaildirFolderFiles:
    """``FolderFiles`` for the Maildir at ``path``."""

    def __init__(self, path: Path, keywords: Mapping[str, str] | None = None) -> None:
        self.path = path
        self._root = os.fspath(path)
        self._keywords = dict(keywords or {})  # letter -> keyword (read_keywords)

    def _list(self) -> list[str]:
        names: list[str] = []
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                # listdir, not scandir: only the names are wanted, and
                # listdir makes no DirEntry per file.  Names starting with
                # "." are temporary or hidden (Maildir spec).
                names += [n for n in os.listdir(f"{self._root}/{sub}") if n[0] != "."]
        return names

    def names(self) -> list[str]:
        return self._list()

    def facts(self, name: str) -> FileFacts | None:
        # The size in the name (Maildir++ ",S=", which our delivery, Dovecot
        # and Courier write) spares a stat per file: a first sync of 100,000
        # files then reads only the directory.  INTERNALDATE is then read
        # when first asked for (``ImapMailbox.with_dates``), as Dovecot does.
        size = _named_size(name)
        if size is not None:
            return FileFacts(size=size, internaldate=0)
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
            missing.discard(stem_of(name))
        return missing

    def flags(self, info: str) -> frozenset[str]:
        return info_flags(info, self._keywords)

    def listing(self) -> str:
        horizon = time.time_ns() - int(TRUSTED_AFTER * 1e9)
        parts = []
        for sub in ("new", "cur"):
            try:
                st = os.stat(f"{self._root}/{sub}")
            except FileNotFoundError:
                return ""
            if st.st_mtime_ns > horizon:
                return ""
            parts.append(f"{st.st_ino}.{st.st_mtime_ns}")
        return " ".join(parts)
