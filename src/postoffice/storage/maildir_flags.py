"""Message flags in Maildir file names, the one codec (IMAP and POP3 use it).

A name is ``<stem>:2,<flags>`` (the Maildir spec's "info"); the stem never
changes, so a message is followed by it after anyone renames the file.

* **System flags** are the spec's letters, kept in ASCII order as the spec
  and Dovecot (maildir-filename-flags.c) write them: D \\Draft, F \\Flagged,
  R \\Answered, S \\Seen, T \\Deleted.  P (passed) has no IMAP flag in
  Dovecot; like every letter we do not know, it is kept as found.
* **Keywords** (RFC 9051 §2.3.2) are the letters a-z, each mapped to a name by
  the folder's ``dovecot-keywords`` file (lines ``<index> <name>``, index
  0-25 for 'a'-'z'), written under Dovecot's own dotlock
  (``dovecot-keywords.lock``, created exclusively) so the two never assign
  one letter twice.  At most 26 keywords per folder: that is the format's
  limit, and Dovecot's.
* **Renames** (``change_flags``) go to ``cur/`` (a message with info lives
  there); a file renamed meanwhile by another session, Dovecot or POP3's
  UPDATE is found again by its stem, as ``pop3_mailbox`` does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from postoffice.storage.safeio import atomic_write

INFO = ":2,"
# IMAP system flag -> Maildir letter (Dovecot's mapping).
SYSTEM_LETTERS: Mapping[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
_LETTER_SYSTEM = {letter: flag for flag, letter in SYSTEM_LETTERS.items()}
KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
KEYWORDS_FILE = "dovecot-keywords"
_LOCK_STALE = 120.0  # Dovecot's KEYWORDS_LOCK_STALE_TIMEOUT (seconds)
_LOCK_TRIES = 50


class MessageGone(Exception):
    """The message was removed by someone else since it was last seen."""


class KeywordsFull(Exception):
    """The folder already maps all 26 keyword letters."""


def stem_of(name: str) -> str:
    """The part of a name no flag change or new/ -> cur/ move alters."""
    return name.partition(INFO)[0]


def flags_of(name: str) -> str:
    """The flag letters of ``name`` ("" without info)."""
    _stem, sep, flags = name.partition(INFO)
    return flags if sep else ""


def with_flags(name: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> str:
    """``name`` with the letters ``add`` set and ``remove`` cleared; other
    letters are kept; all in ASCII order, each once (Maildir spec)."""
    letters = (set(flags_of(name)) | set(add)) - set(remove)
    return stem_of(name) + INFO + "".join(sorted(letters))


def system_flags(letters: str) -> frozenset[str]:
    """The IMAP system flags the letters hold."""
    return frozenset(_LETTER_SYSTEM[ch] for ch in letters if ch in _LETTER_SYSTEM)


def system_letters(flags: Iterable[str]) -> str:
    """Letters for IMAP system flags (case-insensitive, RFC 9051 §2.3.2);
    ValueError for a flag Maildir cannot hold (\\Recent is the session's)."""
    known = {flag.lower(): letter for flag, letter in SYSTEM_LETTERS.items()}
    out = set()
    for flag in flags:
        letter = known.get(flag.lower())
        if letter is None:
            raise ValueError(f"not a stored system flag: {flag}")
        out.add(letter)
    return "".join(sorted(out))


# --- keywords -----------------------------------------------------------------
def read_keywords(folder: Path) -> dict[str, str]:
    """letter -> keyword from ``dovecot-keywords``; {} when there is none.
    Lines Dovecot would skip (no space, bad index, a repeated name) are skipped."""
    try:
        text = (folder / KEYWORDS_FILE).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return {}
    table: dict[str, str] = {}
    seen: set[str] = set()
    for line in text.splitlines():
        index, space, keyword = line.partition(" ")
        if not space or not keyword or not index.isdigit() or keyword in seen:
            continue
        if int(index) < len(KEYWORD_LETTERS):
            table[KEYWORD_LETTERS[int(index)]] = keyword
            seen.add(keyword)
    return table


def keywords_of(letters: str, table: Mapping[str, str]) -> frozenset[str]:
    """The keywords the letters hold (letters missing from ``table`` are
    unknown to everyone and ignored, as Dovecot ignores them)."""
    return frozenset(table[ch] for ch in letters if ch in table)


def info_flags(letters: str, table: Mapping[str, str]) -> frozenset[str]:
    """Every IMAP flag the ``:2,`` letters hold: system flags and the
    keywords of ``table`` (letter -> keyword, as ``read_keywords`` gives)."""
    return system_flags(letters) | keywords_of(letters, table)


def keyword_letters(folder: Path, keywords: Iterable[str]) -> str:
    """Letters for ``keywords`` in ``folder``, assigning new letters (written
    to ``dovecot-keywords`` durably) for keywords not yet in it.  Blocking.
    Raise KeywordsFull when no letter is left."""
    wanted = set(keywords)
    if not wanted:
        return ""
    table = read_keywords(folder)
    by_name = {kw: letter for letter, kw in table.items()}
    if wanted <= by_name.keys():
        return "".join(sorted(by_name[k] for k in wanted))
    with _KeywordsLock(folder):
        table = read_keywords(folder)  # again, under the lock
        by_name = {kw: letter for letter, kw in table.items()}
        free = [ch for ch in KEYWORD_LETTERS if ch not in table]
        missing = sorted(wanted - by_name.keys())
        if len(missing) > len(free):
            raise KeywordsFull(str(folder))
        for keyword, letter in zip(missing, free, strict=False):
            table[letter], by_name[keyword] = keyword, letter
        body = "".join(f"{KEYWORD_LETTERS.index(ch)} {kw}\n" for ch, kw in sorted(table.items()))
        atomic_write(folder / KEYWORDS_FILE, body.encode("utf-8"))
    return "".join(sorted(by_name[k] for k in wanted))


class _KeywordsLock:
    """Dovecot's dotlock on ``dovecot-keywords``: ``dovecot-keywords.lock``
    created with O_EXCL, removed after; a lock older than two minutes is
    stale (its holder died) and is broken, as Dovecot breaks it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"{KEYWORDS_FILE}.lock"

    def __enter__(self) -> None:
        for _ in range(_LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - self.path.stat().st_mtime > _LOCK_STALE:
                        self.path.unlink()
                        continue
                time.sleep(0.02)
                continue
            os.close(fd)
            return
        raise OSError(errno.EWOULDBLOCK, "keywords file is locked", str(self.path))

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- renames ------------------------------------------------------------------
def find_by_stem(folder: Path, stem: str) -> tuple[str, str] | None:
    """(subdir, name) of the message with ``stem`` in ``folder`` now, or None."""
    for sub in ("cur", "new"):
        with contextlib.suppress(FileNotFoundError), os.scandir(folder / sub) as it:
            for entry in it:
                if entry.name.partition(INFO)[0] == stem:
                    return sub, entry.name
    return None


def change_flags(
    folder: Path, subdir: str, name: str, add: str = "", remove: str = ""
) -> tuple[str, str]:
    """Rename the message to carry its new flags, in ``cur/``; return its
    (subdir, name) now.  A file renamed meanwhile is followed by its stem
    (its other flag changes kept); MessageGone if it is no longer there.
    The rename is not fsync'd: a flag change a crash undoes is a lost
    flag, not lost mail (Dovecot does not fsync it either)."""
    if "/" in name or name.startswith(".") or subdir not in ("new", "cur"):
        raise ValueError("not a message file name")
    for _attempt in range(3):
        target = with_flags(name, add, remove)
        if subdir == "cur" and target == name:
            return subdir, name
        try:
            os.rename(folder / subdir / name, folder / "cur" / target)
        except FileNotFoundError:
            found = find_by_stem(folder, stem_of(name))
            if found is None:
                raise MessageGone(stem_of(name)) from None
            subdir, name = found
            continue
        return "cur", target
    raise MessageGone(stem_of(name))  # renamed under us each time: treat as gone
