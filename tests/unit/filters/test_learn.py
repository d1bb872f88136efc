"""Which IMAP moves train rspamd, and as what (filters/learn.py)."""

from __future__ import annotations

import pytest

from postoffice.filters.learn import learn_kind


@pytest.mark.parametrize(
    ("source", "target", "kind"),
    [
        (None, "\\Junk", "spam"),  # INBOX -> Junk
        ("\\Sent", "\\Junk", "spam"),
        ("\\Junk", None, "ham"),  # Junk -> INBOX
        ("\\Junk", "\\Archive", "ham"),
        ("\\Junk", "\\Trash", None),  # throwing spam away is no verdict
        ("\\Junk", "\\Junk", None),
        (None, "\\Trash", None),
        (None, None, None),
    ],
)
def test_learn_kind(source: str | None, target: str | None, kind: str | None) -> None:
    assert learn_kind(source, target) == kind
