"""A user's IMAP folders as Maildir++ directories, laid out as Dovecot lays them.

Names and their checks are ``folder_names``; flags are ``maildir_flags``.
Everything here blocks (directory listings, mkdir, rename, fsync): the IMAP
session calls it through the executor.  Errors a client caused raise
``FolderError`` with the RFC 5530 response code to answer with; OSError
passes through for ``storage.errors.fault_of`` to classify.

* **LIST** (RFC 9051 §6.3.9, CHILDREN RFC 3348): every ``.``-led directory
  that decodes canonically; a name that exists only as the parent of others
  (``.A.B`` without ``.A``) is listed as not selectable (\\NonExistent, and
  \\Noselect for rev1), as Dovecot lists it.
* **CREATE** (RFC 9051 §6.3.4) is atomic and durable: the folder
  (``tmp/ new/ cur/`` and the empty ``maildirfolder`` file Maildir++ asks
  for) is built in the Maildir's own ``tmp/`` and renamed into place, so a
  crash leaves either no folder or a whole one, and two sessions creating
  one name race on one rename(2) (a folder is never an empty directory, so
  the loser's rename fails).  Then the Maildir is fsync'd.
* **DELETE** (RFC 9051 §6.3.5), as Dovecot's Maildir++ does: the folder's
  directory goes; its children stay, so the name lives on as their
  non-selectable parent (the RFC's \\Noselect outcome).  Deleting a name
  that is only such a parent is refused (NONEXISTENT, as Dovecot answers).
  The directory is first renamed to ``..DOVECOT-TRASHED`` (Dovecot's own
  name, which it skips in listings and cleans up after an hour), so it
  disappears whole in one rename before its files are removed.
* **RENAME** (RFC 9051 §6.3.6) moves the folder and every child; all
  targets are checked free first.  Renaming INBOX, which Dovecot's
  Maildir++ refuses, is done as the RFC says: a new folder receives every
  message of INBOX (the files keep their names, so POP3's UIDLs and flags
  are unchanged), INBOX stays, empty, with its children.  Renames of
  children are each durable; a crash between two leaves some moved, which a
  second RENAME of the rest completes.
* **Special use** (RFC 6154): Dovecot takes special-use attributes from its
  configuration (``mailbox Sent { special_use = \\Sent }``), never from the
  Maildir.  So we store nothing on disk either: the attribute follows from
  the top-level name, by ``SPECIAL_USE`` (Dovecot's default
  15-mailboxes.conf plus Archive); ``dovecot_mailbox_config`` writes the
  same table as Dovecot configuration.  CREATE with a USE attribute
  (CREATE-SPECIAL-USE) is accepted when it is the name's own attribute and
  refused with USEATTR otherwise (RFC 6154 §3 allows that).
* **Subscriptions** are not kept here: the IMAP index (SQLite) holds them,
  and Dovecot needs no ``subscriptions`` file to read our folders or flags.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from postoffice.storage import folder_names, quota
from postoffice.storage.folder_names import INBOX, FolderName, folder_path
from postoffice.storage.maildir import ensure_maildir, name_sizes
from postoffice.storage.safeio import fsync_dir

SUBDIRS = ("tmp", "new", "cur")
FOLDER_MARKER = "maildirfolder"  # Maildir++: "this Maildir is a folder" (quota is the parent's)
TRASH_DIR = "..DOVECOT-TRASHED"  # Dovecot's MAILBOX_LIST_MAILDIR_TRASH_DIR_NAME, "." twice

# Top-level name -> RFC 6154 attribute.  Dovecot's default 15-mailboxes.conf
# (Drafts, Junk, Trash, Sent, "Sent Messages"), plus Archive, which the
# issue asks for.  DEFAULT_FOLDERS: what first use creates.
SPECIAL_USE: dict[str, str] = {
    "Drafts": "\\Drafts",
    "Sent": "\\Sent",
    "Sent Messages": "\\Sent",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}
DEFAULT_FOLDERS = ("Drafts", "Sent", "Trash", "Junk", "Archive")


class FolderErrorCode(enum.Enum):
    """The response code (RFC 5530, RFC 6154 §3) a refusal is answered with."""

    NONEXISTENT = "NONEXISTENT"
    ALREADYEXISTS = "ALREADYEXISTS"
    CANNOT = "CANNOT"
    USEATTR = "USEATTR"


class FolderError(Exception):
    """A folder operation refused; the text is safe to show the client."""

    def __init__(self, code: FolderErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass(frozen=True, slots=True)
class FolderInfo:
    """One LIST entry."""

    name: FolderName
    selectable: bool  # False: exists only as the parent of others
    has_children: bool  # RFC 3348 \HasChildren (else \HasNoChildren)
    special_use: str | None

    def attributes(self) -> tuple[str, ...]:
        """LIST attributes (RFC 9051 §7.3.1; \\NonExistent implies \\Noselect,
        so both are given: rev1 clients know only the second)."""
        attrs = [] if self.selectable else ["\\NonExistent", "\\Noselect"]
        attrs.append("\\HasChildren" if self.has_children else "\\HasNoChildren")
        if self.special_use and self.selectable:
            attrs.append(self.special_use)
        return tuple(attrs)


def special_use_of(name: FolderName) -> str | None:
    """The RFC 6154 attribute of ``name`` (top-level names only)."""
    return SPECIAL_USE.get(name.levels[0]) if len(name.levels) == 1 else None


def dovecot_mailbox_config() -> str:
    """``SPECIAL_USE`` as Dovecot configuration for the inbox namespace."""
    lines = [
        f'  mailbox "{name}" {{\n    special_use = {attr}\n  }}\n'
        for name, attr in SPECIAL_USE.items()
    ]
    return "".join(lines)


class Folders:
    """The folders of one user's Maildir (``maildir``, which is INBOX)."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir

    # --- reading ------------------------------------------------------------
    def _existing(self) -> set[FolderName]:
        found: set[FolderName] = set()
        with os.scandir(self.maildir) as it:
            for entry in it:
                folder = folder_names.from_directory(entry.name)
                # Not following symlinks: a link would lead out of the Maildir.
                if folder is not None and entry.is_dir(follow_symlinks=False):
                    found.add(folder)
        return found

    def list_folders(self) -> list[FolderInfo]:
        """Every folder, INBOX first, then in name order; parents that exist
        only through their children included."""
        existing = self._existing()
        existing.add(FolderName((INBOX,)))
        names = set(existing)
        for folder in existing:
            parent = folder.parent
            while parent is not None:
                names.add(parent)
                parent = parent.parent
        parents = {folder.parent for folder in names if folder.parent is not None}
        infos = [FolderInfo(n, n in existing, n in parents, special_use_of(n)) for n in names]
        infos.sort(key=lambda info: (not info.name.is_inbox, info.name.levels))
        return infos

    def exists(self, name: FolderName) -> bool:
        """Whether ``name`` is a selectable folder."""
        return name.is_inbox or _is_folder_dir(folder_path(self.maildir, name))

    def path(self, name: FolderName) -> Path:
        """The Maildir of an existing folder (SELECT); FolderError if none."""
        path = folder_path(self.maildir, name)
        if not (name.is_inbox or _is_folder_dir(path)):
            raise FolderError(FolderErrorCode.NONEXISTENT, "No such mailbox")
        return path

    # --- changing -----------------------------------------------------------
    def create(self, name: FolderName, special_use: str | None = None) -> Path:
        """CREATE ``name`` durably; its Maildir.  Parents are not created:
        in Maildir++ a parent needs no directory (RFC 9051 §6.3.4 lets a
        server leave them implicit), as in Dovecot."""
        if special_use is not None and special_use.lower() != (special_use_of(name) or "").lower():
            raise FolderError(FolderErrorCode.USEATTR, "This mailbox name cannot have that use")
        path = folder_path(self.maildir, name)
        ensure_maildir(self.maildir)  # a first login may come before any mail
        if name.is_inbox or path.exists():
            raise FolderError(FolderErrorCode.ALREADYEXISTS, "Mailbox already exists")
        staging = self.maildir / "tmp" / f".folder.{secrets.token_hex(8)}"
        os.mkdir(staging, 0o700)
        try:
            for sub in SUBDIRS:
                os.mkdir(staging / sub, 0o700)
            fd = os.open(
                staging / FOLDER_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            os.close(fd)
            fsync_dir(staging)
            try:
                os.rename(staging, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FolderError(
                        FolderErrorCode.ALREADYEXISTS, "Mailbox already exists"
                    ) from None
                raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(self.maildir)
        fsync_dir(self.maildir / "tmp")
        return path

    def ensure_special_use(self) -> list[FolderName]:
        """Create the missing ``DEFAULT_FOLDERS`` (the first login); those made."""
        made = []
        for top in DEFAULT_FOLDERS:
            name = FolderName((top,))
            if self.exists(name):
                continue
            with contextlib.suppress(FolderError):  # made by another session meanwhile
                self.create(name)
                made.append(name)
        return made

    def delete(self, name: FolderName) -> None:
        """DELETE ``name`` (see the module docstring for children)."""
        if name.is_inbox:
            raise FolderError(FolderErrorCode.CANNOT, "INBOX cannot be deleted")
        path = folder_path(self.maildir, name)
        if not _is_folder_dir(path):
            raise FolderError(FolderErrorCode.NONEXISTENT, "No such mailbox")
        trash = self.maildir / TRASH_DIR
        for _attempt in range(3):
            try:
                os.rename(path, trash)
                break
            except FileNotFoundError:
                raise FolderError(FolderErrorCode.NONEXISTENT, "No such mailbox") from None
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # A crashed delete's leftovers, or another one under way: clear it.
                shutil.rmtree(trash, ignore_errors=True)
        else:
            raise OSError(errno.EBUSY, "could not move the mailbox aside", str(path))
        fsync_dir(self.maildir)  # gone for good before the OK
        size, count = _message_usage(trash)
        shutil.rmtree(trash, ignore_errors=True)
        if count:
            quota.record(self.maildir, -size, -count)  # Maildir++: after the removal

    def rename(self, old: FolderName, new: FolderName) -> Path:
        """RENAME ``old`` (and its children) to ``new``; the new Maildir."""
        if new.is_inbox:
            raise FolderError(FolderErrorCode.ALREADYEXISTS, "INBOX already exists")
        if old == new or new.is_under(old):
            raise FolderError(FolderErrorCode.CANNOT, "Cannot rename a mailbox into itself")
        if old.is_inbox:
            return self._rename_inbox(new)
        moves = [
            (child, child.moved(old, new)) for child in self._existing() if child.is_under(old)
        ]
        moves.sort(key=lambda pair: len(pair[0].levels))
        old_path = folder_path(self.maildir, old)
        if _is_folder_dir(old_path):
            moves.insert(0, (old, new))
        if not moves:
            raise FolderError(FolderErrorCode.NONEXISTENT, "No such mailbox")
        targets = [(folder_path(self.maildir, a), folder_path(self.maildir, b)) for a, b in moves]
        if any(os.path.lexists(target) for _source, target in targets):
            raise FolderError(FolderErrorCode.ALREADYEXISTS, "Target mailbox already exists")
        for source, target in targets:
            try:
                os.rename(source, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FolderError(
                        FolderErrorCode.ALREADYEXISTS, "Target mailbox already exists"
                    ) from None
                if exc.errno != errno.ENOENT:  # a child deleted meanwhile: nothing to move
                    raise
            fsync_dir(self.maildir)
        return folder_path(self.maildir, new)

    def _rename_inbox(self, new: FolderName) -> Path:
        """RFC 9051 §6.3.6: INBOX's messages move to a new folder ``new``;
        INBOX stays (empty) and its children are not renamed."""
        target = self.create(new)
        for sub in ("new", "cur"):
            moved = False
            for name in _message_names(self.maildir / sub):
                with contextlib.suppress(FileNotFoundError):  # taken by POP3 meanwhile
                    os.rename(self.maildir / sub / name, target / sub / name)
                    moved = True
            if moved:
                fsync_dir(target / sub)
                fsync_dir(self.maildir / sub)
        return target


JUNK = FolderName(("Junk",))


def junk_folder_blocking(maildir: Path) -> Path:
    """The Maildir of the user's Junk folder (RFC 6154 \\Junk), created when
    missing: where mail a DMARC p=quarantine policy covers is delivered."""
    folders = Folders(maildir)
    if not folders.exists(JUNK):
        with contextlib.suppress(FolderError):  # made meanwhile by a session
            folders.create(JUNK)
    return folders.path(JUNK)


def _is_folder_dir(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.stat(path, follow_symlinks=False).st_mode & 0o170000 == 0o040000
    return False


def _message_usage(folder: Path) -> tuple[int, int]:
    """Octets and messages in ``folder``'s new/ and cur/ (sizes from ``S=``)."""
    size = count = 0
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            for name in _message_names(folder / sub):
                named = name_sizes(name.partition(":2,")[0])[1].get("S")
                with contextlib.suppress(FileNotFoundError):
                    size += named if named is not None else os.stat(folder / sub / name).st_size
                    count += 1
    return size, count


def _message_names(directory: Path) -> Iterator[str]:
    with os.scandir(directory) as it:
        names = [e.name for e in it if not e.name.startswith(".")]
    yield from names
