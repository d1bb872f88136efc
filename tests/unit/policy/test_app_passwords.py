"""policy/app_passwords.py: made random, typed any way, kept as a digest."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from postoffice.policy.app_passwords import ALPHABET, digest, generate, normalise


def test_generated_passwords_are_four_groups_and_differ() -> None:
    made = {generate() for _ in range(50)}
    assert len(made) == 50
    for password in made:
        assert re.fullmatch(r"[a-z2-9]{4}(-[a-z2-9]{4}){3}", password)
        assert not set(password) & set("01ilo")


def test_dashes_spaces_and_case_do_not_matter() -> None:
    password = generate()
    bare = password.replace("-", "")
    assert (
        digest(password)
        == digest(bare)
        == digest(bare.upper())
        == digest(password.replace("-", " "))
    )
    assert digest(password) != digest(generate())
    assert len(digest(password) or "") == 64


def test_anything_else_is_no_app_password() -> None:
    for text in ("", "short", "correct-horse-battery-staple", "abcd-efgh-ijkl-mnop", "a" * 17):
        assert normalise(text) is None and digest(text) is None
    assert len(ALPHABET) == len(set(ALPHABET)) == 31


@given(st.text(max_size=40))
def test_any_text_is_judged_without_raising(text: str) -> None:
    found = normalise(text)
    assert found is None or len(found) == 16
