"""runas.py's answers that need no root: who serve runs as when not started
as root, and the fix a refusal of the [tls] key names."""

from __future__ import annotations

from pathlib import Path

import pytest

from postoffice.config.settings import RunSettings, Settings, TlsSettings
from postoffice.runas import identity, tls_refusal


def test_not_started_as_root_the_run_section_is_unused() -> None:
    who = identity(RunSettings(user="no-such-user-here", group="no-such-group"), euid=4242)
    assert who.owner is None
    assert "[run] unused" in who.note


@pytest.mark.parametrize(
    ("run", "group"),
    [
        (RunSettings(user="postoffice"), "postoffice"),  # the user's own group
        (RunSettings(user="postoffice", group="ssl-cert"), "ssl-cert"),  # the one named
    ],
)
def test_a_refused_tls_key_names_the_group_serve_runs_with(run: RunSettings, group: str) -> None:
    settings = Settings(run=run, tls=TlsSettings(cert=Path("/c.pem"), key=Path("/k.pem")))
    fix = tls_refusal(settings)
    assert f"chgrp {group} /k.pem; chmod 640 /k.pem" in fix
