"""The Maildir flags codec, the dovecot-keywords file, and renames that follow a file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.maildir_flags import (
    KEYWORDS_FILE,
    KeywordsFull,
    MessageGone,
    change_flags,
    find_by_stem,
    flags_of,
    info_flags,
    keyword_letters,
    keywords_of,
    read_keywords,
    stem_of,
    system_flags,
    system_letters,
    with_flags,
)

NAME = "1700000000.M1P2Q3.host,S=10,W=11"


@pytest.mark.parametrize(
    ("name", "add", "remove", "expected"),
    [
        (NAME, "S", "", f"{NAME}:2,S"),
        (f"{NAME}:2,", "S", "", f"{NAME}:2,S"),
        (f"{NAME}:2,S", "S", "", f"{NAME}:2,S"),
        (f"{NAME}:2,TS", "FDR", "", f"{NAME}:2,DFRST"),  # ASCII order, as the spec and Dovecot
        (f"{NAME}:2,PSa", "c", "S", f"{NAME}:2,Pac"),  # P and keywords kept
        (f"{NAME}:2,S", "", "S", f"{NAME}:2,"),
    ],
)
def test_with_flags(name: str, add: str, remove: str, expected: str) -> None:
    assert with_flags(name, add, remove) == expected


def test_parts_of_a_name() -> None:
    assert stem_of(f"{NAME}:2,RS") == NAME and stem_of(NAME) == NAME
    assert flags_of(f"{NAME}:2,RS") == "RS" and flags_of(NAME) == ""


def test_system_flags_both_ways() -> None:
    assert system_flags("DFPRSTab") == {"\\Draft", "\\Flagged", "\\Answered", "\\Seen", "\\Deleted"}
    assert system_letters(["\\Seen", "\\deleted", "\\ANSWERED"]) == "RST"
    with pytest.raises(ValueError):
        system_letters(["\\Recent"])


@settings(max_examples=200)
@given(st.text(alphabet="DFPRSTabcz", max_size=8), st.text(alphabet="DFRSTaz", max_size=4))
def test_with_flags_properties(have: str, add: str) -> None:
    name = with_flags(f"{NAME}:2,{have}", add)
    letters = flags_of(name)
    assert stem_of(name) == NAME
    assert list(letters) == sorted(set(letters)) and set(letters) == set(have) | set(add)
    assert with_flags(name, "", add) == with_flags(f"{NAME}:2,{have}", "", add)


def test_keywords_file(tmp_path: Path) -> None:
    assert read_keywords(tmp_path) == {}
    assert keyword_letters(tmp_path, ["$Forwarded", "$Junk"]) == "ab"
    assert (tmp_path / KEYWORDS_FILE).read_text() == "0 $Forwarded\n1 $Junk\n"
    assert keyword_letters(tmp_path, ["$Junk", "Work"]) == "bc"  # known ones keep their letter
    table = read_keywords(tmp_path)
    assert keywords_of("abcz", table) == {"$Forwarded", "$Junk", "Work"}  # z unknown: ignored
    assert not (tmp_path / f"{KEYWORDS_FILE}.lock").exists()


def test_keywords_file_as_dovecot_writes_it(tmp_path: Path) -> None:
    (tmp_path / KEYWORDS_FILE).write_text("3 NonJunk\nnonsense\n30 TooFar\n4 NonJunk\n0 $label1\n")
    assert read_keywords(tmp_path) == {"d": "NonJunk", "a": "$label1"}
    assert keyword_letters(tmp_path, ["New"]) == "b"  # the first free letter


def test_at_most_26_keywords(tmp_path: Path) -> None:
    keyword_letters(tmp_path, [f"k{i}" for i in range(26)])
    with pytest.raises(KeywordsFull):
        keyword_letters(tmp_path, ["one more"])


def test_keywords_wait_for_dovecots_lock_and_break_a_stale_one(tmp_path: Path) -> None:
    lock = tmp_path / f"{KEYWORDS_FILE}.lock"
    lock.write_text("")
    threading.Timer(0.1, lock.unlink).start()
    assert keyword_letters(tmp_path, ["A"]) == "a"
    lock.write_text("")
    old = time.time() - 600
    os.utime(lock, (old, old))
    assert keyword_letters(tmp_path, ["B"]) == "b"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    ensure_maildir(tmp_path / "box")
    return tmp_path / "box"


def test_change_flags_moves_to_cur(folder: Path) -> None:
    (folder / "new" / NAME).write_text("x")
    assert change_flags(folder, "new", NAME, add="S") == ("cur", f"{NAME}:2,S")
    assert os.listdir(folder / "cur") == [f"{NAME}:2,S"] and os.listdir(folder / "new") == []
    assert change_flags(folder, "cur", f"{NAME}:2,S", add="S") == ("cur", f"{NAME}:2,S")
    assert change_flags(folder, "cur", f"{NAME}:2,S", add="F", remove="S") == ("cur", f"{NAME}:2,F")


def test_change_flags_follows_a_file_renamed_meanwhile(folder: Path) -> None:
    """Another session set \\Answered after we listed the message as new."""
    (folder / "cur" / f"{NAME}:2,R").write_text("x")
    assert change_flags(folder, "new", NAME, add="S") == ("cur", f"{NAME}:2,RS")
    assert os.listdir(folder / "cur") == [f"{NAME}:2,RS"]
    assert find_by_stem(folder, NAME) == ("cur", f"{NAME}:2,RS")


def test_change_flags_of_a_removed_message(folder: Path) -> None:
    with pytest.raises(MessageGone):
        change_flags(folder, "new", NAME, add="S")
    with pytest.raises(ValueError):
        change_flags(folder, "new", "../escape", add="S")


def test_info_flags_reads_system_letters_and_known_keywords() -> None:
    table = {"a": "$Forwarded", "b": "Work"}
    assert info_flags("STb", table) == {"\\Seen", "\\Deleted", "Work"}
    # P (passed) has no IMAP flag; unknown letters and keywords missing from
    # dovecot-keywords are ignored, as Dovecot ignores them.
    assert info_flags("PXz?", table) == frozenset()
