"""The systemd unit in contrib/ (#15): it passes ``systemd-analyze verify``
(pointed at this installation's ``postoffice``), runs as an unprivileged user
with only CAP_NET_BIND_SERVICE, hardened, and reloads with SIGHUP."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

UNIT = Path(__file__).parents[2] / "contrib" / "postoffice.service"
INSTALLED = "/usr/local/bin/postoffice"


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(unit: Path, analyze: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def test_the_systemd_unit_verifies_and_is_hardened(
    tmp_path: Path, require_program: Callable[[str], str]
) -> None:
    analyze = require_program("systemd-analyze")
    ours = shutil.which("postoffice", path=str(Path(sys.executable).parent))
    assert ours is not None  # the console script this test's interpreter installed
    text = UNIT.read_text()
    assert INSTALLED in text
    copy = tmp_path / "postoffice.service"
    copy.write_text(text.replace(INSTALLED, ours))
    result = verify(copy, analyze)
    assert result.returncode == 0, result.stderr
    assert "postoffice.service" not in result.stderr, result.stderr  # no warning about it
    unit = settings(text)
    assert unit["User"] == ["postoffice"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["ExecStart"][0].endswith(" serve")
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/postoffice"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallFilter", "@system-service"),
    ):
        assert value in unit[key], key
    # The check can fail: a unit naming a program that is not there does not verify.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(INSTALLED, str(tmp_path / "no-such-postoffice")))
    assert verify(broken, analyze).returncode != 0
