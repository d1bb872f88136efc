"""filters/apply.py: header parsing and edits, envelope edits, spam marks."""

from __future__ import annotations

import pytest

from postoffice.filters.apply import (
    ModificationError,
    edit_envelope,
    edit_headers,
    is_spam,
    render_headers,
    split_header,
)
from postoffice.filters.verdicts import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    DeliverToFolder,
    Redirect,
    ReplaceBody,
)

HEAD = b"Received: from x\n\tby y\nSubject: hi\nX-A: 1\nX-A: 2\n\nbody\n"


def test_split_header_keeps_folding_and_finds_the_body() -> None:
    fields, offset = split_header(HEAD)
    assert fields == [("Received", "from x\n\tby y"), ("Subject", "hi"), ("X-A", "1"), ("X-A", "2")]
    assert HEAD[offset:] == b"body\n"
    assert split_header(b"\nbody") == ([], 1)
    assert split_header(b"Subject: only\n")[1] == len(b"Subject: only\n")


def test_render_round_trips() -> None:
    fields, offset = split_header(HEAD)
    assert render_headers(fields) == HEAD[:offset]


def test_edits_follow_milter_semantics() -> None:
    fields, _ = split_header(HEAD)
    out = edit_headers(
        fields,
        (
            AddHeader("X-End", "e"),
            AddHeader("X-Top", "t", 0),
            AddHeader("X-Far", "f", 99),
            ChangeHeader("x-a", 2, "two"),
            ChangeHeader("X-A", 1, ""),
            ChangeHeader("X-Missing", 3, "added"),
            ChangeHeader("X-Gone", 1, ""),
        ),
    )
    assert out == [
        ("X-Top", "t"),
        ("Received", "from x\n\tby y"),
        ("Subject", "hi"),
        ("X-A", "two"),
        ("X-End", "e"),
        ("X-Far", "f"),
        ("X-Missing", "added"),
    ]


def test_a_value_cannot_start_a_field_of_its_own() -> None:
    out = edit_headers([], (AddHeader("X-V", "a\r\nBcc: evil@x\r\n second"),))
    assert render_headers(out) == b"X-V: a\n\tBcc: evil@x\n second\n\n"
    with pytest.raises(ModificationError):
        edit_headers([], (AddHeader("Bad Name", "v"),))


def test_envelope_edits() -> None:
    edit = edit_envelope(
        ["a@x", "b@x"],
        (
            AddRecipient("c@x"),
            AddRecipient("A@x"),  # already there
            DeleteRecipient("B@X"),
            ChangeSender("s@y"),
            DeliverToFolder("Lists"),
            ReplaceBody(b"new"),
        ),
    )
    assert edit.recipients == ["a@x", "c@x"] and edit.added == {"c@x"}
    assert (edit.sender, edit.folder, edit.body) == ("s@y", "Lists", b"new")
    assert edit_envelope(["a@x"], (Redirect(("r@x", "r@x")),)).recipients == ["r@x"]
    assert edit_envelope(["a@x"], ()).sender is None


@pytest.mark.parametrize(
    ("fields", "spam"),
    [
        ([("X-Spam", "Yes")], True),
        ([("x-spam", " yes, score=9")], True),
        ([("X-Spam-Flag", "YES")], True),
        ([("X-Spam-Action", "add header")], True),
        ([("X-Spam-Action", "rewrite\n subject")], True),
        ([("X-Spam-Action", "no action")], False),
        ([("X-Spam", "No")], False),
        ([], False),
    ],
)
def test_is_spam(fields: list[tuple[str, str]], spam: bool) -> None:
    assert is_spam(fields) is spam
