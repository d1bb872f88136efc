"""Maildir name parsing: the sizes a name carries."""

from __future__ import annotations

import pytest

from postoffice.storage.maildir import name_sizes


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("1700000000.M1P2.host", ("1700000000.M1P2.host", {})),
        ("1700000000.M1P2.host,S=10", ("1700000000.M1P2.host", {"S": 10})),
        ("1700000000.M1P2.host,S=10,W=12", ("1700000000.M1P2.host", {"S": 10, "W": 12})),
        ("base,W=7,X=1", ("base", {"W": 7})),
        ("base,S=x", ("base", {})),
    ],
)
def test_name_sizes(stem: str, expected: tuple[str, dict[str, int]]) -> None:
    assert name_sizes(stem) == expected
