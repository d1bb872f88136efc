"""Dovecot and postoffice share one Maildir++ tree: folders and flags, both ways.

Dovecot (doveadm, through a real instance's auth) lists the folders our
``storage/folders.py`` made, with their hierarchy and special-use
attributes, and reads the flags and keywords ``storage/maildir_flags.py``
wrote; then Dovecot makes folders and sets flags, and we read them.
Outside CI a missing Dovecot skips; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.storage import folders as folder_ops
from postoffice.storage.folder_names import parse
from postoffice.storage.folders import Folders
from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.maildir_flags import (
    change_flags,
    flags_of,
    keyword_letters,
    keywords_of,
    read_keywords,
    system_flags,
)
from tests.interop.dovecot import DOVEADM, DOVECOT, Dovecot, need
from tests.support.helpers import ALICE, ALICE_PW

pytestmark = pytest.mark.interop

MESSAGE = b"Subject: hi\n\nhello\n"
NAME = "1700000000.M1P2Q3.host,S=19,W=21"


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Folders, Dovecot]]:
    need(DOVECOT)
    need(DOVEADM)
    # Not under pytest's 0700 temp tree: Dovecot's processes run as other users.
    root = Path(tempfile.mkdtemp(prefix="po-dovecot-folders-"))
    root.chmod(0o755)
    mail = root / "mail"
    maildir = mail / "example.test" / "alice"
    ensure_maildir(maildir)
    dovecot = Dovecot(root / "dovecot", mail, {ALICE: ALICE_PW})
    # The namespace as Dovecot has it by default (separator: the layout's
    # "."), with our special-use table as its mailbox settings.
    dovecot.conf.write_text(
        dovecot.conf.read_text()
        + "namespace inbox {\n  inbox = yes\n"
        + folder_ops.dovecot_mailbox_config()
        + "}\n"
    )
    try:
        yield Folders(maildir), dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_dovecot_reads_our_folders_and_flags(shared: tuple[Folders, Dovecot]) -> None:
    folders, dovecot = shared
    folders.ensure_special_use()
    for name in ("Work.Projects", "Entwürfe", "A&B"):
        folders.create(parse(name))
    box = folders.path(parse("Work.Projects"))
    (box / "new" / NAME).write_bytes(MESSAGE)
    letters = keyword_letters(box, ["$Forwarded", "Work"])
    change_flags(box, "new", NAME, add="SF" + letters)
    dovecot.own_mail()
    dovecot.start()

    listed = set(dovecot.doveadm("mailbox", "list", "-u", ALICE).split("\n")) - {""}
    assert listed == {
        "INBOX", "Drafts", "Sent", "Trash", "Junk", "Archive",
        "Work", "Work.Projects", "Entwürfe", "A&B",
    }  # fmt: skip
    # Dovecot's IMAP, preauthenticated on a pipe, as a client sees the tree.
    imap = dovecot.doveadm_input(
        b'a LIST (SPECIAL-USE) "" "*"\r\nb LIST "" "*"\r\nc LOGOUT\r\n', "exec", "imap", "-u", ALICE
    )
    assert '* LIST (\\HasNoChildren \\Sent) "." Sent' in imap
    assert '* LIST (\\HasNoChildren \\Archive) "." Archive' in imap
    assert '* LIST (\\Noselect \\HasChildren) "." Work' in imap
    assert '"." Entw&APw-rfe' in imap
    flags = dovecot.doveadm("fetch", "-u", ALICE, "flags", "mailbox", "Work.Projects", "all")
    got = set(flags.split(":", 1)[1].split()) - {"\\Recent"}  # the session's, not stored
    assert got == {"\\Seen", "\\Flagged", "$Forwarded", "Work"}


def test_we_read_a_tree_dovecot_made(shared: tuple[Folders, Dovecot]) -> None:
    folders, dovecot = shared
    if dovecot.master_pid() is None:
        dovecot.own_mail()
        dovecot.start()
    dovecot.doveadm("mailbox", "create", "-u", ALICE, "Made.By.Dovecot", "Größe")
    dovecot.doveadm_input(MESSAGE, "save", "-u", ALICE, "-m", "Made.By.Dovecot")
    dovecot.doveadm(
        "flags",
        "add",
        "-u",
        ALICE,
        "\\Answered \\Deleted NonJunk",
        "mailbox",
        "Made.By.Dovecot",
        "all",
    )
    names = {info.name.imap(): info for info in folders.list_folders()}
    assert {"Made", "Made.By", "Made.By.Dovecot", "Größe"} <= names.keys()
    assert not names["Made.By"].selectable and names["Made.By"].has_children
    box = folders.path(parse("Made.By.Dovecot"))
    [name] = [p.name for sub in ("cur", "new") for p in (box / sub).iterdir()]
    letters = flags_of(name)
    assert system_flags(letters) == {"\\Answered", "\\Deleted"}
    assert keywords_of(letters, read_keywords(box)) == {"NonJunk"}
