"""Real POP3 clients from Debian against the real server: curl, fetchmail, mpop.

Both ways people use POP3: download-and-delete, and leave-on-server where
the client fetches only what it has not seen before, by UIDL.  Outside CI a
missing program skips its test; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import MDA
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"


# One line per message, written by fetchmail's MDA: stdin -> a numbered file.
@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(tmp_path / "server")
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    yield srv
    srv.stop()


def deliver(srv: PostofficeServer, subject: str, body: bytes = b"Hello.\n") -> bytes:
    """A message written into alice's Maildir the way a delivery agent does."""
    md = srv.maildir(ALICE)
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    data = f"From: sender@remote.test\nSubject: {subject}\n\n".encode() + body
    name = f"{time.time_ns() // 1000}.M{time.perf_counter_ns() % 1_000_000}P{os.getpid()}.test"
    name += f",S={len(data)},W={len(data) + data.count(10)}"
    (md / "tmp" / name).write_bytes(data)
    os.rename(md / "tmp" / name, md / "new" / name)
    return data


def cert(srv: PostofficeServer) -> str:
    return str(srv.data_dir / "tls" / "cert.pem")


def run(args: list[str], home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        check=False,
    )


def on_server(srv: PostofficeServer) -> int:
    return len(srv.messages(ALICE))


# --- curl -------------------------------------------------------------------------


def curl_args(curl: str, srv: PostofficeServer, *extra: str) -> list[str]:
    return [curl, "-sS", "--max-time", "30", "--cacert", cert(srv), "-u", f"{ALICE}:{ALICE_PW}",
            *extra]  # fmt: skip


@pytest.mark.parametrize("scheme", ["pop3-stls", "pop3s"])
def test_curl_lists_retrieves_and_deletes(
    server: PostofficeServer, require_program, tmp_path: Path, scheme: str
) -> None:
    curl = require_program("curl")
    first = deliver(server, "one", b".starts with a dot\n..two\nend\n")
    second = deliver(server, "two")
    if scheme == "pop3s":
        url, tls = f"pop3s://127.0.0.1:{server.ports['pop3s']}", []
    else:
        url, tls = f"pop3://127.0.0.1:{server.ports['pop3']}", ["--ssl-reqd"]
    listing = run(curl_args(curl, server, *tls, url + "/"), tmp_path)
    assert listing.returncode == 0, listing.stderr
    crlf = [m.replace(b"\n", b"\r\n") for m in (first, second)]
    assert listing.stdout.splitlines() == [f"1 {len(crlf[0])}", f"2 {len(crlf[1])}"]
    retr = subprocess.run(
        curl_args(curl, server, *tls, url + "/1"), capture_output=True, timeout=60, check=False
    )
    assert retr.returncode == 0, retr.stderr
    assert retr.stdout == crlf[0]  # dot-unstuffed by curl, byte for byte
    uidl = run(curl_args(curl, server, *tls, "-X", "UIDL", url + "/"), tmp_path)
    assert len(uidl.stdout.splitlines()) == 2
    for mechanism in ("PLAIN", "LOGIN"):
        login = run(curl_args(curl, server, *tls, "--login-options", f"AUTH={mechanism}",
                              url + "/2"), tmp_path)  # fmt: skip
        assert login.returncode == 0, login.stderr
        assert "Subject: two" in login.stdout
    dele = run(curl_args(curl, server, *tls, "-X", "DELE", "-I", url + "/1"), tmp_path)
    assert dele.returncode == 0, dele.stderr
    assert on_server(server) == 1


def test_curl_without_tls_cannot_log_in(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:
    curl = require_program("curl")
    deliver(server, "secret")
    url = f"pop3://127.0.0.1:{server.ports['pop3']}/1"
    result = run(curl_args(curl, server, url), tmp_path)
    assert result.returncode != 0
    assert "Subject: secret" not in result.stdout


def test_curl_wrong_password_is_denied(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:
    curl = require_program("curl")
    url = f"pop3s://127.0.0.1:{server.ports['pop3s']}/"
    args = [curl, "-sS", "--cacert", cert(server), "-u", f"{ALICE}:wrong", url]
    assert run(args, tmp_path).returncode == 67  # CURLE_LOGIN_DENIED


# --- fetchmail ----------------------------------------------------------------------


def fetchmail_rc(srv: PostofficeServer, home: Path, out: Path, *, implicit_tls: bool) -> Path:
    (home / "mda.py").write_text(MDA)
    port = srv.ports["pop3s" if implicit_tls else "pop3"]
    tls = "ssl" if implicit_tls else 'sslproto "tls1.2+"'
    rc = home / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {port} protocol pop3 uidl\n"
        f'  user "{ALICE}" there with password "{ALICE_PW}" is "nobody" here\n'
        f'  {tls} sslcertck sslcertfile "{cert(srv)}" sslcommonname "localhost"\n'
        "  keep\n"
        f'  mda "{sys.executable} {home / "mda.py"} {out}"\n'
    )
    rc.chmod(0o600)
    return rc


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_keep_mode_fetches_only_new_mail(
    server: PostofficeServer, require_program, tmp_path: Path, implicit_tls: bool
) -> None:
    fetchmail = require_program("fetchmail")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    rc = fetchmail_rc(server, home, out, implicit_tls=implicit_tls)
    args = [fetchmail, "-f", str(rc), "--nosyslog", "--idfile", str(home / "ids")]
    first = deliver(server, "first", b".dot line\nbody\n")
    deliver(server, "second")

    run1 = run(args, home)
    assert run1.returncode == 0, run1.stdout + run1.stderr  # 0: mail was fetched
    fetched = sorted(out.iterdir())
    assert len(fetched) == 2
    assert fetched[0].read_bytes().endswith(first.split(b"\n\n", 1)[1])

    run2 = run(args, home)
    assert run2.returncode == 1, run2.stdout + run2.stderr  # 1: no new mail
    assert len(list(out.iterdir())) == 2

    deliver(server, "third")
    run3 = run(args, home)
    assert run3.returncode == 0, run3.stdout + run3.stderr
    fetched = sorted(out.iterdir())
    assert len(fetched) == 3
    assert b"Subject: third" in fetched[2].read_bytes()
    assert on_server(server) == 3  # keep: nothing deleted


# --- mpop ---------------------------------------------------------------------------


def mpop_rc(srv: PostofficeServer, home: Path, maildir: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    common = (
        f"host 127.0.0.1\nuser {ALICE}\npassword {ALICE_PW}\n"
        f"delivery maildir {maildir}\nuidls_file {home / 'uidls'}\n"
        f"tls on\ntls_trust_file {cert(srv)}\n"
    )
    rc = home / "mpoprc"
    rc.write_text(
        f"account keep\n{common}port {srv.ports['pop3']}\ntls_starttls on\nkeep on\n\n"
        f"account delete\n{common}port {srv.ports['pop3s']}\ntls_starttls off\n"
        "auth user\nkeep off\n"
    )
    rc.chmod(0o600)
    return rc


def test_mpop_leave_on_server_then_download_and_delete(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:
    mpop = require_program("mpop")
    home, local = tmp_path / "home", tmp_path / "Maildir"
    home.mkdir()
    rc = mpop_rc(server, home, local)

    def received() -> int:
        return sum(len(os.listdir(local / sub)) for sub in ("new", "cur"))

    deliver(server, "one")
    deliver(server, "two")
    keep = run([mpop, "-C", str(rc), "keep"], home)
    assert keep.returncode == 0, keep.stdout + keep.stderr
    assert received() == 2 and on_server(server) == 2
    again = run([mpop, "-C", str(rc), "keep"], home)
    assert again.returncode == 0, again.stdout + again.stderr
    assert received() == 2  # nothing new by UIDL

    deliver(server, "three")
    delete = run([mpop, "-C", str(rc), "delete"], home)
    assert delete.returncode == 0, delete.stdout + delete.stderr
    assert received() == 3
    assert on_server(server) == 0  # downloaded and deleted, old ones too
