"""sieve-connect (Debian) against the real ManageSieve listener, then real SMTP delivery.

sieve-connect upgrades with STARTTLS, authenticates with PLAIN, uploads a
script (a literal), activates it and lists it; a script with a syntax
error is refused with its line.  Then a message sent with smtplib is filed
by the uploaded script, so what the client stored is what delivery runs.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostofficeServer]:
    port = free_port(("127.0.0.1",))
    srv = PostofficeServer(
        tmp_path / "server", sections={"listen": {"managesieve": [f"127.0.0.1:{port}"]}}
    )
    srv.ports["managesieve"] = port
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    yield srv
    srv.stop()


def sieve_connect(
    program: str, srv: PostofficeServer, tmp_path: Path, *args: str, password: str = ALICE_PW
) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.write(write_end, password.encode() + b"\n")
    os.close(write_end)
    try:
        return subprocess.run(
            [
                program,
                "--server",
                "127.0.0.1",
                "--port",
                str(srv.ports["managesieve"]),
                "--user",
                ALICE,
                "--passwordfd",
                str(read_end),
                "--notlsverify",
                "--authmech",
                "PLAIN",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            pass_fds=(read_end,),
            env={**os.environ, "HOME": str(tmp_path), "LC_ALL": "C"},
            check=False,
        )
    finally:
        os.close(read_end)


def test_sieve_connect_uploads_activates_and_delivery_runs_it(
    server: PostofficeServer, require_program: Callable[[str], str], tmp_path: Path
) -> None:
    program = require_program("sieve-connect")
    script = tmp_path / "rules.sieve"
    script.write_text(
        'require ["fileinto", "mailbox"];\n'
        'if header :contains "subject" "via-managesieve" { fileinto :create "Sorted"; }\n'
    )
    up = sieve_connect(program, server, tmp_path, "--upload", "--localsieve", str(script),
                       "--remotesieve", "rules")  # fmt: skip
    assert up.returncode == 0, up.stderr + up.stdout
    act = sieve_connect(program, server, tmp_path, "--activate", "--remotesieve", "rules")
    assert act.returncode == 0, act.stderr + act.stdout
    listing = sieve_connect(program, server, tmp_path, "--list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout == '"rules" ACTIVE\n'
    assert server.cli("sieve", "list", ALICE).stdout == "rules  (active)\n"
    # sieve-connect upgraded with STARTTLS before it sent the password.
    assert f"managesieve session client=127.0.0.1 user={ALICE} tls=yes" in server.log()

    bad = tmp_path / "bad.sieve"
    bad.write_text('require "fileinto";\nfileinto "x"\n')
    refused = sieve_connect(program, server, tmp_path, "--upload", "--localsieve", str(bad),
                            "--remotesieve", "bad")  # fmt: skip
    assert refused.returncode != 0
    assert "line 3" in refused.stderr + refused.stdout
    wrong = sieve_connect(program, server, tmp_path, "--list", password="not-the-password")
    assert wrong.returncode != 0

    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        client.sendmail(
            "someone@elsewhere.test",
            [ALICE],
            b"From: someone@elsewhere.test\r\nSubject: via-managesieve\r\n\r\nhi\r\n",
        )
    sorted_dir = server.maildir(ALICE) / ".Sorted" / "new"
    assert wait_for(lambda: sorted_dir.is_dir() and len(list(sorted_dir.iterdir())) == 1)
    assert b"via-managesieve" in next(sorted_dir.iterdir()).read_bytes()
