"""Start the real server on either event loop it can run on.

The server uses uvloop where it is installed and asyncio's own loop where it
is not (app._run_loop); the two hand bytes to a protocol at different
moments (TLS 1.3 data right after the handshake, for one), so the TLS tests
run on both.  ``env_without_uvloop`` puts a ``uvloop`` module that fails to
import first on the server's path: the server then runs exactly as on a
machine without uvloop.  ``runs_uvloop`` checks which loop a process really
has (uvloop's extension module is mapped into it or not).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

LOOPS = ("asyncio", "uvloop")


def env_without_uvloop(tmp: Path) -> dict[str, str]:
    shim = tmp / "no-uvloop"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "uvloop.py").write_text('raise ImportError("uvloop left out for this test")\n')
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{shim}{os.pathsep}{path}" if path else str(shim)}


def runs_uvloop(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "/uvloop/loop." in maps


def require_loop(loop: str) -> None:
    """Without uvloop installed the uvloop case is skipped, or fails in CI
    (scripts/test.sh installs it with the ``fast`` extra)."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        if os.environ.get("CI"):
            pytest.fail("uvloop is not installed (scripts/test.sh installs '.[test,fast]')")
        pytest.skip("uvloop is not installed")


def server_env(loop: str, tmp: Path) -> dict[str, str]:
    """The environment for a server on ``loop`` ("asyncio" or "uvloop")."""
    require_loop(loop)
    return env_without_uvloop(tmp) if loop == "asyncio" else {}
