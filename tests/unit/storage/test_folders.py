"""Maildir++ folder operations: LIST, CREATE, DELETE, RENAME, special use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postoffice.storage import quota
from postoffice.storage.folder_names import parse
from postoffice.storage.folders import (
    DEFAULT_FOLDERS,
    TRASH_DIR,
    FolderError,
    FolderErrorCode,
    Folders,
    dovecot_mailbox_config,
    special_use_of,
)
from postoffice.storage.maildir import ensure_maildir


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    maildir = tmp_path / "user"
    ensure_maildir(maildir)
    return Folders(maildir)


def listing(folders: Folders) -> dict[str, tuple[str, ...]]:
    return {info.name.imap(): info.attributes() for info in folders.list_folders()}


def put_message(folder: Path, name: str, body: bytes = b"x\n", sub: str = "cur") -> Path:
    path = folder / sub / name
    path.write_bytes(body)
    return path


def test_create_makes_a_maildirplusplus_folder(folders: Folders) -> None:
    path = folders.create(parse("Work.Projects"))
    assert path == folders.maildir / ".Work.Projects"
    assert sorted(p.name for p in path.iterdir()) == ["cur", "maildirfolder", "new", "tmp"]
    assert (path / "maildirfolder").stat().st_size == 0
    assert os.listdir(folders.maildir / "tmp") == []  # the staging directory was renamed away
    assert folders.exists(parse("Work.Projects")) and not folders.exists(parse("Work"))


def test_create_refuses_existing_and_inbox(folders: Folders) -> None:
    folders.create(parse("A"))
    for name in ("A", "INBOX", "inbox"):
        with pytest.raises(FolderError) as info:
            folders.create(parse(name))
        assert info.value.code is FolderErrorCode.ALREADYEXISTS


def test_create_loses_a_race_cleanly(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another session creates the folder between our check and our rename."""
    real_rename = os.rename

    def racing_rename(src: Path, dst: Path) -> None:
        folders.maildir.joinpath(".A", "cur").mkdir(parents=True, exist_ok=True)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    with pytest.raises(FolderError) as info:
        folders.create(parse("A"))
    assert info.value.code is FolderErrorCode.ALREADYEXISTS
    assert os.listdir(folders.maildir / "tmp") == []


def test_list_children_and_implicit_parents(folders: Folders) -> None:
    for name in ("Work.Projects.2024", "Work.Notes", "Sent", "Entwürfe"):
        folders.create(parse(name))
    (folders.maildir / ".Not&a-folder").mkdir()  # not canonical: ignored
    (folders.maildir / TRASH_DIR).mkdir()  # a delete under way: ignored
    (folders.maildir / ".Link").symlink_to("/etc")  # never followed
    (folders.maildir / ".File").write_text("")  # not a directory
    assert listing(folders) == {
        "INBOX": ("\\HasNoChildren",),
        "Entwürfe": ("\\HasNoChildren",),
        "Sent": ("\\HasNoChildren", "\\Sent"),
        "Work": ("\\NonExistent", "\\Noselect", "\\HasChildren"),
        "Work.Notes": ("\\HasNoChildren",),
        "Work.Projects": ("\\NonExistent", "\\Noselect", "\\HasChildren"),
        "Work.Projects.2024": ("\\HasNoChildren",),
    }
    assert folders.list_folders()[0].name.is_inbox


def test_inbox_children(folders: Folders) -> None:
    folders.create(parse("INBOX.Sub"))
    assert (folders.maildir / ".INBOX.Sub").is_dir()
    assert listing(folders)["INBOX"] == ("\\HasChildren",)


def test_special_use_folders_on_first_use(folders: Folders) -> None:
    made = folders.ensure_special_use()
    assert [n.imap() for n in made] == list(DEFAULT_FOLDERS)
    assert folders.ensure_special_use() == []  # second login: nothing to do
    attrs = listing(folders)
    assert attrs["Drafts"][-1] == "\\Drafts" and attrs["Archive"][-1] == "\\Archive"
    assert attrs["Junk"][-1] == "\\Junk" and attrs["Trash"][-1] == "\\Trash"
    assert special_use_of(parse("Work.Sent")) is None  # top level only
    assert 'mailbox "Sent Messages" {\n    special_use = \\Sent\n  }' in dovecot_mailbox_config()


def test_create_special_use(folders: Folders) -> None:
    folders.create(parse("Sent"), special_use="\\sent")  # flags are case-insensitive
    with pytest.raises(FolderError) as info:
        folders.create(parse("Outgoing"), special_use="\\Sent")
    assert info.value.code is FolderErrorCode.USEATTR
    assert not folders.exists(parse("Outgoing"))


def test_delete(folders: Folders) -> None:
    path = folders.create(parse("Old"))
    put_message(path, "1.M1P1.h,S=2:2,S")
    folders.delete(parse("Old"))
    assert not path.exists() and not (folders.maildir / TRASH_DIR).exists()
    with pytest.raises(FolderError) as info:
        folders.delete(parse("Old"))
    assert info.value.code is FolderErrorCode.NONEXISTENT


def test_delete_refusals(folders: Folders) -> None:
    folders.create(parse("A.B"))
    for name, code in (
        ("INBOX", FolderErrorCode.CANNOT),
        ("A", FolderErrorCode.NONEXISTENT),  # only a parent (\Noselect): RFC 9051 §6.3.5
        ("Missing", FolderErrorCode.NONEXISTENT),
    ):
        with pytest.raises(FolderError) as info:
            folders.delete(parse(name))
        assert info.value.code is code


def test_delete_a_parent_keeps_its_children(folders: Folders) -> None:
    folders.create(parse("A"))
    folders.create(parse("A.B"))
    folders.delete(parse("A"))
    assert listing(folders)["A"] == ("\\NonExistent", "\\Noselect", "\\HasChildren")
    assert folders.exists(parse("A.B"))


def test_delete_clears_a_stale_trash_dir(folders: Folders) -> None:
    stale = folders.maildir / TRASH_DIR
    (stale / "cur").mkdir(parents=True)
    (stale / "cur" / "leftover").write_text("x")
    folders.create(parse("A"))
    folders.delete(parse("A"))
    assert not stale.exists() and not folders.exists(parse("A"))


def test_delete_records_quota(folders: Folders) -> None:
    path = folders.create(parse("A"))
    put_message(path, "1.M1P1.h,S=10,W=11:2,", b"0123456789")
    put_message(path, "2.M1P1.h", b"abc", sub="new")
    quota.recount_blocking(folders.maildir, 1000)
    assert quota.count_blocking(folders.maildir) == quota.Usage(13, 2)
    folders.delete(parse("A"))
    recorded = quota.read_recorded(folders.maildir)
    assert recorded is not None and recorded.usage == quota.Usage(0, 0)


def test_rename_with_children(folders: Folders) -> None:
    for name in ("Work", "Work.Projects", "Work.Projects.X", "Workshop"):
        folders.create(parse(name))
    put_message(folders.maildir / ".Work.Projects", "1.M1P1.h:2,S")
    assert folders.rename(parse("Work"), parse("Play.Old")) == folders.maildir / ".Play.Old"
    names = [i.name.imap() for i in folders.list_folders()]
    assert names == [
        "INBOX",
        "Play",
        "Play.Old",
        "Play.Old.Projects",
        "Play.Old.Projects.X",
        "Workshop",
    ]
    assert (folders.maildir / ".Play.Old.Projects" / "cur" / "1.M1P1.h:2,S").exists()


def test_rename_an_implicit_parent(folders: Folders) -> None:
    folders.create(parse("A.B"))
    folders.rename(parse("A"), parse("C"))
    assert folders.exists(parse("C.B")) and not folders.exists(parse("A.B"))


def test_rename_refusals(folders: Folders) -> None:
    folders.create(parse("A"))
    folders.create(parse("A.B"))
    folders.create(parse("X"))
    folders.create(parse("Y.B"))
    cases = [
        ("Missing", "Z", FolderErrorCode.NONEXISTENT),
        ("A", "X", FolderErrorCode.ALREADYEXISTS),
        ("A", "Y", FolderErrorCode.ALREADYEXISTS),  # its child A.B would land on Y.B
        ("A", "A.C", FolderErrorCode.CANNOT),
        ("A", "A", FolderErrorCode.CANNOT),
        ("X", "INBOX", FolderErrorCode.ALREADYEXISTS),
    ]
    for old, new, code in cases:
        with pytest.raises(FolderError) as info:
            folders.rename(parse(old), parse(new))
        assert info.value.code is code, (old, new)
    assert folders.exists(parse("A")) and folders.exists(parse("A.B"))  # nothing moved


def test_rename_inbox_moves_its_messages(folders: Folders) -> None:
    """RFC 9051 §6.3.6: the messages go, INBOX and its children stay."""
    put_message(folders.maildir, "1.M1P1.h,S=2:2,S")
    put_message(folders.maildir, "2.M1P1.h,S=2", sub="new")
    folders.create(parse("INBOX.Kept"))
    target = folders.rename(parse("INBOX"), parse("Old Mail"))
    assert os.listdir(target / "cur") == ["1.M1P1.h,S=2:2,S"]
    assert os.listdir(target / "new") == ["2.M1P1.h,S=2"]
    assert os.listdir(folders.maildir / "cur") == os.listdir(folders.maildir / "new") == []
    assert folders.exists(parse("INBOX.Kept"))
    with pytest.raises(FolderError):
        folders.rename(parse("INBOX"), parse("Old Mail"))


def test_path_of_selectable_folders(folders: Folders) -> None:
    folders.create(parse("A.B"))
    assert folders.path(parse("INBOX")) == folders.maildir
    assert folders.path(parse("A.B")) == folders.maildir / ".A.B"
    with pytest.raises(FolderError):
        folders.path(parse("A"))


def test_first_login_before_any_mail(tmp_path: Path) -> None:
    folders = Folders(tmp_path / "new-user")
    assert len(folders.ensure_special_use()) == len(DEFAULT_FOLDERS)
    assert (tmp_path / "new-user" / "cur").is_dir()
