"""Users' Sieve scripts on disk: one directory per mailbox, one marked active.

Shared by the three places that touch scripts: delivery (reads the active
one), the CLI (``postoffice sieve``) and ManageSieve.  All of it blocks;
the server calls it through its executor.  The layout, under
``data_dir/sieve``:

    DOMAIN/LOCAL/NAME.sieve   each script, written atomically (safeio)
    DOMAIN/LOCAL/.active      the active script's name (absent: none)

The directory comes from ``mailbox_path``, the same check that keeps
Maildir paths to two safe components of a validated address; script names
are checked here (``check_name``) so they stay one plain file name.  A
script is stored only after it parses and checks (the callers compile it
with ``delivery.sieve.compile_script`` first: storage imports no protocol
core), so delivery meets only scripts that were valid when written.
"""

from __future__ import annotations

import contextlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from postoffice.mail.address import Address
from postoffice.storage.maildir import mailbox_path
from postoffice.storage.safeio import atomic_write, fsync_dir

ACTIVE_FILE = ".active"
SUFFIX = ".sieve"
MAX_NAME_BYTES = 128
# RFC 5804 leaves quotas to servers; these bound one user's disk use.
MAX_SCRIPTS = 16
MAX_SCRIPT_BYTES = 64 * 1024  # the parser's default bound (SieveLimits.max_bytes)


class ScriptError(ValueError):
    """A request about scripts that cannot be met (bad name, none such, quota)."""


@dataclass(frozen=True, slots=True)
class ScriptInfo:
    name: str
    active: bool


def check_name(name: str) -> str:
    """A script name that is one safe file name (RFC 5804 §1.6: no controls)."""
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ScriptError("script name must be 1 to 128 bytes")
    if name.startswith(".") or "/" in name or "\\" in name:
        raise ScriptError("script name may not start with '.' or hold a slash")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise ScriptError("script name may not hold control characters")
    return unicodedata.normalize("NFC", name)


class SieveScripts:
    """The scripts of every mailbox under ``root`` (``data_dir/sieve``)."""

    def __init__(self, root: Path, max_bytes: int = MAX_SCRIPT_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def user_dir(self, mailbox: Address) -> Path:
        return mailbox_path(self.root, mailbox)

    def list(self, mailbox: Address) -> list[ScriptInfo]:
        folder = self.user_dir(mailbox)
        active = self.active_name(mailbox)
        try:
            names = sorted(
                n[: -len(SUFFIX)]
                for n in os.listdir(folder)
                if n.endswith(SUFFIX) and not n.startswith(".")
            )
        except FileNotFoundError:
            return []
        return [ScriptInfo(n, n == active) for n in names]

    def get(self, mailbox: Address, name: str) -> bytes:
        try:
            return (self.user_dir(mailbox) / (check_name(name) + SUFFIX)).read_bytes()
        except FileNotFoundError:
            raise ScriptError(f"no script named {name!r}") from None

    def put(self, mailbox: Address, name: str, data: bytes) -> None:
        """Store ``data`` as ``name``; the caller compiled it first (delivery/sieve.py)."""
        name = check_name(name)
        if len(data) > self.max_bytes:
            raise ScriptError(f"script larger than {self.max_bytes} bytes")
        folder = self.user_dir(mailbox)
        target = folder / (name + SUFFIX)
        if not target.exists() and len(self.list(mailbox)) >= MAX_SCRIPTS:
            raise ScriptError(f"at most {MAX_SCRIPTS} scripts per mailbox")
        self._ensure(folder)
        atomic_write(target, data)

    def have_space(self, mailbox: Address, name: str, size: int) -> bool:
        name = check_name(name)
        if size > self.max_bytes:
            return False
        exists = (self.user_dir(mailbox) / (name + SUFFIX)).exists()
        return exists or len(self.list(mailbox)) < MAX_SCRIPTS

    def activate(self, mailbox: Address, name: str | None) -> None:
        """Make ``name`` the active script; None deactivates (RFC 5804 §2.8)."""
        folder = self.user_dir(mailbox)
        if name is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / ACTIVE_FILE)
                fsync_dir(folder)
            return
        name = check_name(name)
        if not (folder / (name + SUFFIX)).is_file():
            raise ScriptError(f"no script named {name!r}")
        atomic_write(folder / ACTIVE_FILE, name.encode("utf-8"))

    def active_name(self, mailbox: Address) -> str | None:
        try:
            raw = (self.user_dir(mailbox) / ACTIVE_FILE).read_bytes()
        except FileNotFoundError:
            return None
        return raw.decode("utf-8", "replace").strip() or None

    def active_script(self, mailbox: Address) -> bytes | None:
        """The active script's text, or None when the mailbox has none."""
        if not self.root.is_dir():
            return None  # the common case: nobody uses Sieve, one stat
        name = self.active_name(mailbox)
        if name is None:
            return None
        try:
            return self.get(mailbox, name)
        except ScriptError:
            return None

    def delete(self, mailbox: Address, name: str) -> None:
        name = check_name(name)
        if self.active_name(mailbox) == name:
            raise ScriptError("the active script cannot be deleted")
        folder = self.user_dir(mailbox)
        try:
            os.unlink(folder / (name + SUFFIX))
        except FileNotFoundError:
            raise ScriptError(f"no script named {name!r}") from None
        fsync_dir(folder)

    def rename(self, mailbox: Address, old: str, new: str) -> None:
        old, new = check_name(old), check_name(new)
        folder = self.user_dir(mailbox)
        if (folder / (new + SUFFIX)).exists():
            raise ScriptError(f"a script named {new!r} exists")
        try:
            os.rename(folder / (old + SUFFIX), folder / (new + SUFFIX))
        except FileNotFoundError:
            raise ScriptError(f"no script named {old!r}") from None
        if self.active_name(mailbox) == old:
            atomic_write(folder / ACTIVE_FILE, new.encode("utf-8"))
        fsync_dir(folder)

    def _ensure(self, folder: Path) -> None:
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fsync_dir(folder.parent)
        fsync_dir(folder.parent.parent)
