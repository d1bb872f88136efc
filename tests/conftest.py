from __future__ import annotations

import os
import shutil
import tempfile
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


@pytest.fixture
def require_root() -> None:
    """Tests that give files away or change users need root: outside CI they
    skip without it; in CI (run as root) its absence is a failure."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test needs root, and CI runs as root")
        pytest.skip("needs root")


@pytest.fixture
def service_dir(require_root: None) -> Iterator[Path]:
    """A directory a service user (nobody) can reach, unlike pytest's
    tmp_path under a root-only /tmp/pytest-of-root: for data directories
    that belong to such a user.  Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="postoffice-service-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
