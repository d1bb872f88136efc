"""What scripts/test.sh promises to install is really usable on this machine.

The test command checks capabilities (a program runs, a Perl module loads),
not package names: on a fresh Debian, ``apt-get install
--no-install-recommends swaks`` gave a swaks without its TLS modules, and
three STARTTLS tests failed with "TLS not available: requires Net::SSLeay".
Each capability line of the script is checked here, so a line that names
the wrong package, or a check that passes without the capability, fails in
CI instead of some distant interop test; and swaks itself must start TLS.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import make_server

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "test.sh"


def capability_checks() -> list[str]:
    text = SCRIPT.read_text()
    block = re.search(r"^CAPABILITIES=\((.*?)^\)", text, re.S | re.M)
    assert block, "scripts/test.sh has no CAPABILITIES=( ... ) list"
    lines = re.findall(r'^\s*"([^"|]+)\|([^"]+)"', block.group(1), re.M)
    assert lines, "the CAPABILITIES list is empty"
    return [check for check, _packages in lines]


@pytest.mark.parametrize("check", capability_checks())
def test_capability_is_present(check: str) -> None:
    done = subprocess.run(["bash", "-c", check], capture_output=True, timeout=30, check=False)
    if done.returncode != 0:
        message = f"scripts/test.sh installs it, yet `{check}` fails"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_swaks_can_start_tls(require_program, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    swaks = require_program("swaks")
    srv = make_server(tmp_path)
    try:
        done = subprocess.run(
            [
                swaks,
                "--server",
                "127.0.0.1",
                "--port",
                str(srv.ports["smtp"]),
                "--tls",
                "--from",
                "friend@remote.test",
                "--to",
                "alice@example.test",
                "--timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        srv.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "TLS started" in done.stdout
