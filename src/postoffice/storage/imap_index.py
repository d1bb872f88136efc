"""The persistent IMAP state of one user's mailboxes, behind an interface.

IMAP needs what a Maildir does not keep: UIDs (RFC 9051 §2.3.1.1), the
folder's UIDVALIDITY and UIDNEXT, mod-sequences for CONDSTORE and QRESYNC
(RFC 7162), INTERNALDATE, the flags Maildir names cannot carry (keywords
beyond the 26 letters), the UIDs expunged since a mod-sequence (QRESYNC's
VANISHED, RFC 7162 §3.2.10), and the subscription list (RFC 9051 §6.3.7).
``ImapIndex`` is that state for one user; ``storage/sqlite_index.py`` is the
embedded implementation, and a PostgreSQL one (several nodes sharing mail)
can take its place: nothing here names SQLite.

The Maildir stays the truth about *which* messages exist; the index is the
truth about their UIDs and mod-sequences.  ``sync`` reconciles the two: a
message is known by its file's *stem* (the name before ``:2,``), which no
flag change or new/ -> cur/ move alters, so those keep their UID; a file
with a new stem gets the next UID, in delivery order; a stem that vanished
is recorded as expunged.

Ordering rules for callers that change files (the IMAP session), so that a
crash between the two steps can only make ``sync`` do what the caller was
about to: change the files first (write and fsync an APPENDed message,
unlink an EXPUNGEd one, rename a MOVEd one), then tell the index; flag
changes go to the index first (it is their truth, with the UNCHANGEDSINCE
check), then to the file name, which ``sync`` then sees as no change.  A
caller holds its folder's lock across both steps; the index itself is
consistent whatever the interleaving.

Every method blocks (disk, fsync): the session calls them in its executor,
as it does ``Pop3Mailbox``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

# The system flags a message can keep (RFC 9051 §2.3.2).  \Recent is not
# among them: it was session state (RFC 3501) and is gone in IMAP4rev2.
SYSTEM_FLAGS = frozenset({"\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen"})
_SYSTEM_BY_LOWER = {flag.lower(): flag for flag in SYSTEM_FLAGS}

# UIDVALIDITY and UIDs are 32-bit non-zero numbers (RFC 9051 §2.3.1.1, nz-number).
MAX_UID = 2**32 - 1


def canonical_flags(flags: Iterable[str]) -> frozenset[str]:
    """``flags`` with system flags in their canonical spelling: flags are
    case-insensitive (RFC 9051 §2.3.2), so ``\\SEEN`` is ``\\Seen``."""
    return frozenset(_SYSTEM_BY_LOWER.get(flag.lower(), flag) for flag in flags)


class ImapIndexError(Exception):
    """The index cannot do what was asked; the text is safe to log."""


class NoSuchFolder(ImapIndexError):
    """The folder is not in the index (RFC 9051 [NONEXISTENT])."""


class FolderExists(ImapIndexError):
    """CREATE or RENAME onto a name in use (RFC 9051 [ALREADYEXISTS])."""


class IndexCorrupt(ImapIndexError):
    """The index file is damaged; reopening it rebuilds it (new UIDVALIDITY)."""


@dataclass(frozen=True, slots=True)
class FolderState:
    """What SELECT and STATUS report of a folder (RFC 9051 §7.1, RFC 7162 §3.1.2)."""

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int = 0  # how many the folder holds (EXISTS)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One message as the index knows it."""

    uid: int
    stem: str  # the Maildir name before ":2,": stable across flag changes and new/ -> cur/
    info: str  # the letters after ":2," last seen on disk or written by us ("" in new/)
    flags: frozenset[str]  # system flags and keywords
    modseq: int  # RFC 7162 §3.1.1: the last change to this message
    internaldate: int  # seconds since the epoch (RFC 9051 §2.3.3); 0: not read yet
    size: int  # RFC822.SIZE as stored (LF endings; the session converts)


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What ``sync`` needs of a file it has not seen before."""

    size: int
    internaldate: int  # 0: not read (the caller reads it when first needed)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A file the caller has just written into a folder (APPEND)."""

    name: str  # its file name (stem, and ":2,<info>" if it has one)
    flags: frozenset[str]
    internaldate: int
    size: int


class FolderFiles(Protocol):
    """A folder's files on disk, as ``sync`` reads them.

    ``sync`` calls ``names`` while it holds the index's write lock, so an
    APPEND committed meanwhile cannot be mistaken for an expunge.
    """

    def names(self) -> Iterable[str]:
        """The file names in new/ then cur/ (new/ first: a file moving to
        cur/ while they are listed is then seen at least once)."""
        ...

    def facts(self, name: str) -> FileFacts | None:
        """Size and INTERNALDATE of a file first seen; None if it is gone."""
        ...

    def gone(self, stems: Collection[str]) -> Collection[str]:
        """Which of ``stems``, missing from ``names``, really are gone: a
        file renamed while its directory was read can be missed (readdir
        gives no promise for entries renamed meanwhile), so they are looked
        for once more before being expunged."""
        ...

    def flags(self, info: str) -> frozenset[str]:
        """The flags the ``:2,`` info letters mean in this folder (system
        letters; keyword letters per the folder's keyword list)."""
        ...

    def listing(self) -> str:
        """A token that changes whenever ``names`` could give another answer,
        taken before ``names``; "" when it cannot be trusted (then every
        ``sync`` reads the names).  ``sync`` skips the listing when the token
        is the one of its last full read."""
        ...


@dataclass(frozen=True, slots=True)
class FolderCounts:
    """STATUS's numbers (RFC 9051 §6.3.11), counted by the index."""

    messages: int
    unseen: int
    deleted: int
    size: int  # octets as stored (LF endings)


@dataclass(frozen=True, slots=True)
class Structure:
    """What FETCH derives from a message's text and the index keeps, so that
    the next FETCH need not read the file (Dovecot's ``dovecot.index.cache``
    does the same): its RFC822.SIZE and its ENVELOPE, BODYSTRUCTURE and BODY
    in their wire form.  A message's text never changes, so neither does this."""

    uid: int
    wire_size: int
    envelope: bytes
    bodystructure: bytes
    body: bytes


class RecentUids:
    """The UIDs a session holds as \\Recent (RFC 3501 §2.3.2): the runs
    ``ImapIndex.claim_recent`` gave it, [first, below) each.  Runs, not a
    set: a first SELECT of 100,000 new messages claims them all at once."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []

    def add(self, first: int, below: int) -> None:
        if first >= below:
            return
        if self.runs and self.runs[-1][1] == first:  # the usual case: the next run
            self.runs[-1] = (self.runs[-1][0], below)
        else:
            self.runs.append((first, below))

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and any(first <= uid < below for first, below in self.runs)

    def __bool__(self) -> bool:
        return bool(self.runs)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What ``sync`` found changed on disk: the untagged responses to send."""

    folder: FolderState
    # New UIDs, ascending.  A Sequence, not a tuple: an implementation may
    # build the records only when read (a first sync of 100,000 files).
    added: Sequence[MessageRecord] = ()
    expunged: tuple[int, ...] = ()  # UIDs, ascending
    flags_changed: tuple[MessageRecord, ...] = ()  # by another Maildir tool

    @property
    def changed(self) -> bool:
        return bool(self.added or self.expunged or self.flags_changed)


class StoreMode(enum.Enum):
    """STORE FLAGS, +FLAGS, -FLAGS (RFC 9051 §6.4.6)."""

    REPLACE = "FLAGS"
    ADD = "+FLAGS"
    REMOVE = "-FLAGS"


@dataclass(frozen=True, slots=True)
class StoreResult:
    modseq: int  # the mod-sequence given to the changed messages; the folder's if none
    changed: tuple[MessageRecord, ...]  # messages whose flags changed, new state
    modified: tuple[int, ...]  # UIDs refused by UNCHANGEDSINCE (RFC 7162 §3.1.3 MODIFIED)


@dataclass(frozen=True, slots=True)
class ExpungeResult:
    modseq: int
    expunged: tuple[int, ...]  # UIDs this call removed (others: already gone)


@dataclass(frozen=True, slots=True)
class CopyResult:
    """COPYUID (RFC 4315 §3): the target's UIDVALIDITY and UID pairs."""

    uidvalidity: int
    pairs: tuple[tuple[int, int], ...]  # (source UID, target UID), source order
    expunged: tuple[int, ...] = ()  # MOVE: the source UIDs removed (RFC 6851 §4.3)


class ImapIndex(Protocol):
    """One user's IMAP state.  Folder names are the caller's (the Maildir++
    layer's canonical names); the index only keeps them apart."""

    # --- folders ---------------------------------------------------------------
    def folder(self, name: str) -> FolderState | None: ...

    def folders(self) -> list[FolderState]: ...

    def create_folder(self, name: str) -> FolderState:
        """A new folder with a UIDVALIDITY no earlier folder of this user had;
        FolderExists if it is there."""
        ...

    def ensure_folder(self, name: str) -> FolderState:
        """The folder, created (as ``create_folder``) if missing."""
        ...

    def rename_folder(self, old: str, new: str) -> FolderState:
        """Same UIDVALIDITY, UIDs and mod-sequences under the new name."""
        ...

    def delete_folder(self, name: str) -> None:
        """Forget the folder; a later folder of that name is a new one."""
        ...

    # --- the Maildir and the index ---------------------------------------------
    def sync(self, folder: str, files: FolderFiles) -> SyncResult: ...

    def append(self, folder: str, messages: Sequence[NewMessage]) -> tuple[int, ...]:
        """UIDs for files just written (APPENDUID, RFC 4315 §3), in order."""
        ...

    def copy(self, source: str, target: str, pairs: Sequence[tuple[int, str]]) -> CopyResult:
        """(source UID, new file name in target) for files just copied; flags
        and INTERNALDATE come along (RFC 9051 §6.4.7)."""
        ...

    def move(self, source: str, target: str, pairs: Sequence[tuple[int, str]]) -> CopyResult:
        """``copy`` and the expunge from ``source`` in one step (RFC 6851)."""
        ...

    # --- flags and expunges -----------------------------------------------------
    def store(
        self,
        folder: str,
        uids: Iterable[int],
        mode: StoreMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> StoreResult: ...

    def note_info(self, folder: str, uid: int, info: str) -> None:
        """The caller renamed the message's file to carry ``info``."""
        ...

    def expunge(self, folder: str, uids: Iterable[int]) -> ExpungeResult: ...

    # --- queries ----------------------------------------------------------------
    def messages(self, folder: str, first: int = 1, last: int = MAX_UID) -> list[MessageRecord]:
        """Messages with ``first`` <= UID <= ``last``, ascending."""
        ...

    def uids(self, folder: str, first: int = 1, last: int = MAX_UID) -> list[int]: ...

    def changed_since(self, folder: str, modseq: int) -> list[MessageRecord]:
        """Messages whose mod-sequence is above ``modseq`` (CHANGEDSINCE)."""
        ...

    def vanished_since(self, folder: str, modseq: int) -> list[int]:
        """UIDs expunged with a mod-sequence above ``modseq`` (VANISHED)."""
        ...

    def note_dates(self, folder: str, dates: Sequence[tuple[int, int]]) -> None:
        """(UID, INTERNALDATE) read from files ``sync`` did not stat."""
        ...

    def counts(self, folder: str) -> FolderCounts: ...

    def first_unseen(self, folder: str, below: int) -> int | None:
        """The sequence number of the first message without \\Seen among
        those with UID < ``below`` (RFC 3501 §6.3.1 OK [UNSEEN]); None if all
        are seen."""
        ...

    # --- \Recent -------------------------------------------------------------------------
    def first_recent(self, folder: str) -> int:
        """The first UID no session has claimed as \\Recent yet (RFC 3501
        §2.3.2): messages from it on are recent to the next session."""
        ...

    def claim_recent(self, folder: str, below: int) -> int:
        """Claim \\Recent for the unclaimed UIDs below ``below`` (a session's
        UIDNEXT): returns the first UID the caller now holds as recent; UIDs
        in [returned, ``below``) are its recent ones (none if equal).  Each
        UID is claimed by one session only."""
        ...

    def recent_count(self, folder: str, first: int | None = None, below: int = MAX_UID + 1) -> int:
        """How many messages have UIDs in [``first``, ``below``); ``first``
        None: from the first unclaimed UID (STATUS RECENT)."""
        ...

    # --- the FETCH structure cache ----------------------------------------------------
    def structures(self, folder: str, uids: Collection[int]) -> dict[int, Structure]:
        """The cached structures of those of ``uids`` that have one."""
        ...

    def remember_structures(self, folder: str, structures: Sequence[Structure]) -> None:
        """Keep ``structures`` (of messages still present); a cache: losing
        it in a crash costs only the work of building it again."""
        ...

    # --- subscriptions (RFC 9051 §6.3.7, §6.3.8) ------------------------------------
    def subscribe(self, name: str) -> None: ...

    def unsubscribe(self, name: str) -> None: ...

    def subscriptions(self) -> list[str]: ...

    def close(self) -> None: ...
