"""Fixtures of the IMAP index tests: an index file in a fresh Maildir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.storage.sqlite_index import INDEX_NAME, SqliteImapIndex


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "maildir" / INDEX_NAME


@pytest.fixture
def index(path: Path) -> Iterator[SqliteImapIndex]:
    idx = SqliteImapIndex(path)
    try:
        yield idx
    finally:
        idx.close()
