from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import PostofficeServer


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    from tests.support.smtp import RawSmtp

    while RawSmtp.opened:
        RawSmtp.opened.pop().close()


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
        from tests.support.smtp import RawSmtp

        while RawSmtp.opened:
            RawSmtp.opened.pop().close()
        srv.stop()


@pytest.fixture
def require_program():  # type: ignore[no-untyped-def]
    """Return a function giving the path of an external program.

    Outside CI a missing program skips the test; in CI (``CI`` set) it fails,
    so interop tests are never silently skipped there.
    """
    import os
    import shutil
    import sys

    def find(name: str) -> str:
        # Beside the interpreter too: a venv's console scripts (dkimverify)
        # are there even when its bin/ is not on PATH.
        beside = os.path.join(os.path.dirname(sys.executable), name)
        for candidate in (shutil.which(name), beside, f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (scripts/test.sh installs it)")
        pytest.skip(f"{name} is not installed")
        raise AssertionError("unreachable")

    return find
