from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import PostofficeServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostofficeServer]:
    """A running server with domain example.test and users alice and bob."""
    srv = PostofficeServer(tmp_path)
    srv.add_user("alice@example.test", "alice-password-1")
    srv.add_user("bob@example.test", "bob-password-2")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
