"""IMAP folder names <-> Maildir++ directory names, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.storage.folder_names import (
    MAX_LEVELS,
    FolderName,
    FolderNameError,
    folder_path,
    from_directory,
    parse,
)


@pytest.mark.parametrize(
    ("name", "directory"),
    [
        ("INBOX", ""),
        ("inbox", ""),
        ("Sent", ".Sent"),
        ("Work.Projects", ".Work.Projects"),
        ("Entwürfe", ".Entw&APw-rfe"),
        ("A&B", ".A&-B"),
        ("INBOX.Sub", ".INBOX.Sub"),
        ("Inbox.Sub", ".INBOX.Sub"),  # RFC 9051 §5.1: INBOX in any case
        ("inboxes", ".inboxes"),  # only the whole level is INBOX
        ("Sent Messages", ".Sent Messages"),
    ],
)
def test_names_to_directories(name: str, directory: str) -> None:
    folder = parse(name)
    assert folder.directory == directory
    if directory:
        assert from_directory(directory) == folder


def test_slash_separator_maps_to_the_same_directory() -> None:
    assert parse("Work/Projects", "/") == parse("Work.Projects")
    assert parse("Work/Projects", "/").imap("/") == "Work/Projects"
    with pytest.raises(ValueError):
        parse("Work", "\\")


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".Hidden",  # a leading separator: an empty first level
        "Trailing.",
        "Two..Dots",
        "a/b",  # "/" inside a level (would be a path)
        "../../etc",
        "x\x00y",
        "tab\there",
        "new\nline",
        "del\x7f",
        "c1\x85",
        "star*",
        "per%cent",
        "lone\ud800",
        ".".join(["a"] * (MAX_LEVELS + 1)),
        "x" * 255,  # "." + 255 octets is more than NAME_MAX
        "ü" * 100,  # short in characters, long in modified UTF-7
    ],
)
def test_refusals(name: str) -> None:
    with pytest.raises(FolderNameError):
        parse(name)


def test_dot_inside_a_level_is_refused_with_the_slash_separator() -> None:
    with pytest.raises(FolderNameError):
        parse("v1.2/notes", "/")


def test_longest_name_fits() -> None:
    assert len(parse("x" * 254).directory) == 255


@pytest.mark.parametrize(
    "dirname",
    [
        "cur",
        "new",
        "tmp",
        ".",
        "..",
        "..DOVECOT-TRASHED",
        "..Hidden",
        ".A..B",
        ".A.",
        ".INBOX",  # INBOX is the Maildir itself, never a folder directory
        ".inbox.Sub",  # INBOX's children are spelled ".INBOX."
        ".Entw&APw-rfe&-",  # fine ...
        ".&AGE-",  # ... but "a" spelled as base64 would alias ".a"
        ".bad&run",
        ".ctl\x01",
        ".star*",
    ],
)
def test_directories_that_are_no_folder(dirname: str) -> None:
    if dirname == ".Entw&APw-rfe&-":
        assert from_directory(dirname) == FolderName(("Entwürfe&",))
    else:
        assert from_directory(dirname) is None


def test_folder_path_is_one_component_inside(tmp_path: Path) -> None:
    assert folder_path(tmp_path, parse("INBOX")) == tmp_path
    assert folder_path(tmp_path, parse("A.B")) == tmp_path / ".A.B"
    for bad in (("..",), ("a/b",), ("",)):
        with pytest.raises(FolderNameError):
            folder_path(tmp_path, FolderName(bad))


def test_hierarchy_helpers() -> None:
    a, ab, abc = parse("A"), parse("A.B"), parse("A.B.C")
    assert abc.parent == ab and ab.parent == a and a.parent is None
    assert abc.is_under(a) and not a.is_under(a) and not parse("AB").is_under(a)
    assert abc.moved(a, parse("X.Y")) == parse("X.Y.B.C")
    with pytest.raises(ValueError):
        parse("Z").moved(a, parse("X"))


_level = st.text(
    st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="./*%"),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200)
@given(st.lists(_level, min_size=1, max_size=4))
def test_round_trip(levels: list[str]) -> None:
    name = ".".join(levels)
    folder = parse(name)
    if folder.is_inbox:
        return
    assert from_directory(folder.directory) == folder
    assert parse(folder.imap()) == folder
    assert "/" not in folder.directory and folder.directory.startswith(".")


@settings(max_examples=200)
@given(st.text(max_size=30))
def test_any_text_is_refused_or_safe(name: str) -> None:
    try:
        folder = parse(name)
    except FolderNameError:
        return
    directory = folder.directory
    assert "/" not in directory and "\x00" not in directory
    assert directory == "" or (directory.startswith(".") and not directory.startswith(".."))
