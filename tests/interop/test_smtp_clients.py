"""Real SMTP clients from Debian against the real server: swaks, msmtp, curl; and fetchmail deleting.

tests/integration covers swaks with STARTTLS on 25 and with AUTH LOGIN on
587/465, and tests/interop/test_pop3_clients.py covers curl, fetchmail (keep)
and mpop over POP3.  Here: swaks in plain text, with pipelining, AUTH PLAIN
and a MIME attachment; msmtp as a user's submission client (587 STARTTLS,
465, a wrong password, a forged From:); curl's smtp://, smtp:// with
STARTTLS and smtps://; and fetchmail in download-and-delete mode.  Outside
CI a missing program skips its test; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, ALICE_PW, BOB, make_server
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    srv = make_server(tmp_path_factory.mktemp("clients"))
    yield srv
    srv.stop()


@pytest.fixture
def server(shared: PostofficeServer) -> PostofficeServer:
    for path in (shared.data_dir / "mail").glob("*/*/*/*"):
        path.unlink()
    return shared


def run(
    args: list[str], home: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        timeout=60,
        env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )


def cert(srv: PostofficeServer) -> str:
    return str(srv.data_dir / "tls" / "cert.pem")


def one(srv: PostofficeServer, address: str) -> bytes:
    (path,) = srv.messages(address)
    return path.read_bytes()


# --- swaks -------------------------------------------------------------------------


def swaks(require_program, srv: PostofficeServer, port: str, *args: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [require_program("swaks"), "--server", "127.0.0.1", "--port", str(srv.ports[port]),
            "--timeout", "30", *args]  # fmt: skip


def test_swaks_plain_pipelined(server: PostofficeServer, require_program, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = swaks(require_program, server, "smtp", "--from", "friend@remote.test",
                 "--to", f"{ALICE},{BOB}", "--pipeline", "--header", "Subject: piped",
                 "--body", ".leading dot\n..two\nend")  # fmt: skip
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<** " not in result.stdout  # no error reply anywhere
    content = one(server, ALICE)
    assert content == one(server, BOB)
    assert b"with ESMTP id" in content  # no TLS: plain ESMTP
    assert b"\n\n.leading dot\n..two\nend\n" in content


def test_swaks_auth_plain_with_attachment_on_465(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    attachment = tmp_path / "report.bin"
    attachment.write_bytes(bytes(range(256)) * 64)
    args = swaks(require_program, server, "submissions", "--tls-on-connect", "--auth", "PLAIN",
                 "--auth-user", ALICE, "--auth-password", ALICE_PW, "--from", ALICE,
                 "--to", BOB, "--header", f"From: Alice <{ALICE}>",
                 "--attach", f"@{attachment}")  # fmt: skip
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    content = one(server, BOB)
    assert b"with ESMTPSA id" in content
    assert b"Content-Transfer-Encoding: BASE64" in content.replace(b"base64", b"BASE64")


def test_swaks_sees_refusals(server: PostofficeServer, require_program, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    unknown = run(swaks(require_program, server, "smtp", "--from", "f@remote.test",
                        "--to", "nobody@example.test"), tmp_path)  # fmt: skip
    assert unknown.returncode != 0 and "550 5.1.1" in unknown.stdout
    relay = run(swaks(require_program, server, "smtp", "--from", "f@remote.test",
                      "--to", "victim@elsewhere.test"), tmp_path)  # fmt: skip
    assert relay.returncode != 0 and "554 5.7.1" in relay.stdout
    assert server.messages(ALICE) == []


def test_swaks_long_body_line_is_stored_byte_identical(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A 2,500-octet body line (a badly written program's mail): Postfix keeps it
    whole, and so must we (#11 item 2), not bounce it with 554 5.6.0."""
    line = "".join(chr(c) for c in range(33, 127)) * 26 + "x" * 56
    assert len(line) == 2500
    args = swaks(require_program, server, "smtp", "--from", "app@remote.test", "--to", ALICE,
                 "--header", "Subject: report", "--body", f"start\n{line}\nend")  # fmt: skip
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<** " not in result.stdout
    assert f"\n\nstart\n{line}\nend\n".encode() in one(server, ALICE)


# --- msmtp -------------------------------------------------------------------------


def msmtprc(srv: PostofficeServer, home: Path, password: str = ALICE_PW) -> Path:
    common = (
        f"host 127.0.0.1\nauth on\nuser {ALICE}\npassword {password}\nfrom {ALICE}\n"
        f"tls on\ntls_trust_file {cert(srv)}\ntls_host_override localhost\n"
        f"logfile {home / 'msmtp.log'}\n"
    )
    rc = home / "msmtprc"
    rc.write_text(
        f"account starttls\n{common}port {srv.ports['submission']}\ntls_starttls on\n\n"
        f"account implicit\n{common}port {srv.ports['submissions']}\ntls_starttls off\n"
    )
    rc.chmod(0o600)
    return rc


@pytest.mark.parametrize("account", ["starttls", "implicit"])
def test_msmtp_submits(
    server: PostofficeServer, require_program, tmp_path: Path, account: str
) -> None:  # type: ignore[no-untyped-def]
    msmtp = require_program("msmtp")
    rc = msmtprc(server, tmp_path)
    message = (
        f"From: Alice <{ALICE}>\nTo: {BOB}\nSubject: via msmtp {account}\n\n"
        "Hello Bob.\n.\n..dots stay\n"
    ).encode()
    result = run([msmtp, "-C", str(rc), "-a", account, "-t"], tmp_path, message)
    assert result.returncode == 0, result.stdout + result.stderr
    content = one(server, BOB)
    assert f"Subject: via msmtp {account}".encode() in content
    assert content.endswith(b"\n\nHello Bob.\n.\n..dots stay\n")  # dots survive both ways
    assert b"with ESMTPSA id" in content and b"\nMessage-ID: <" in content


def test_msmtp_wrong_password_and_forged_from(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    msmtp = require_program("msmtp")
    bad = msmtprc(server, tmp_path, password="wrong-password")
    message = f"From: {ALICE}\nTo: {BOB}\nSubject: x\n\nx\n".encode()
    result = run([msmtp, "-C", str(bad), "-a", "starttls", "-t"], tmp_path, message)
    assert result.returncode != 0
    assert "535" in result.stderr or "authentication failed" in result.stderr.lower()
    good = msmtprc(server, tmp_path)
    forged = f"From: {BOB}\nTo: {BOB}\nSubject: forged\n\nx\n".encode()
    result = run([msmtp, "-C", str(good), "-a", "starttls", "-t"], tmp_path, forged)
    assert result.returncode != 0 and "553" in result.stderr
    assert server.messages(BOB) == []


# --- curl --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["smtp-plain", "smtp-starttls-auth", "smtps-auth"])
def test_curl_sends_mail(
    server: PostofficeServer, require_program, tmp_path: Path, mode: str
) -> None:  # type: ignore[no-untyped-def]
    curl = require_program("curl")
    mail = tmp_path / "mail.txt"
    mail.write_bytes(f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: curl {mode}\r\n\r\nbody\r\n".encode())
    if mode == "smtp-plain":
        url, extra, sender = (
            f"smtp://127.0.0.1:{server.ports['smtp']}/client.test",
            [],
            "f@remote.test",
        )
    elif mode == "smtp-starttls-auth":
        url = f"smtp://127.0.0.1:{server.ports['submission']}/client.test"
        extra, sender = ["--ssl-reqd", "-u", f"{ALICE}:{ALICE_PW}"], ALICE
    else:
        url = f"smtps://127.0.0.1:{server.ports['submissions']}/client.test"
        extra, sender = ["-u", f"{ALICE}:{ALICE_PW}"], ALICE
    # The certificate is checked for real: it names 127.0.0.1 (net/tls.py).
    args = [curl, "-sS", "--max-time", "30", "--cacert", cert(server), *extra,
            "--mail-from", sender, "--mail-rcpt", BOB, "--mail-rcpt", ALICE,
            "--upload-file", str(mail), url]  # fmt: skip
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert one(server, BOB) == one(server, ALICE)
    assert f"Subject: curl {mode}".encode() in one(server, BOB)


def test_curl_cannot_relay_or_log_in_without_tls(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    curl = require_program("curl")
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    common = [curl, "-sS", "--max-time", "30", "--upload-file", str(mail)]
    relay = run([*common, "--mail-from", "f@remote.test", "--mail-rcpt", "v@elsewhere.test",
                 f"smtp://127.0.0.1:{server.ports['smtp']}/c.test"], tmp_path)  # fmt: skip
    assert relay.returncode != 0 and "554" in relay.stderr
    login = run([*common, "-u", f"{ALICE}:{ALICE_PW}", "--mail-from", ALICE, "--mail-rcpt", BOB,
                 f"smtp://127.0.0.1:{server.ports['submission']}/c.test"], tmp_path)  # fmt: skip
    assert login.returncode != 0  # AUTH is neither offered nor taken in plain text
    assert server.messages(BOB) == []


# --- fetchmail, download and delete ---------------------------------------------------

MDA = """
import os, sys
out = sys.argv[1]
with open(os.path.join(out, "%06d" % len(os.listdir(out))), "wb") as fh:
    fh.write(sys.stdin.buffer.read())
"""


def test_fetchmail_downloads_and_deletes(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import smtplib

    fetchmail = require_program("fetchmail")
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
        for i in range(3):
            client.sendmail(
                "f@remote.test", [ALICE], f"Subject: fetch {i}\r\n\r\n.{i}\r\n".encode()
            )
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "mda.py").write_text(MDA)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {server.ports['pop3s']} protocol pop3 uidl\n"
        f'  user "{ALICE}" there with password "{ALICE_PW}" is "nobody" here\n'
        f'  ssl sslcertck sslcertfile "{cert(server)}" sslcommonname "localhost"\n'
        "  nokeep fetchall\n"
        f'  mda "{sys.executable} {tmp_path / "mda.py"} {out}"\n'
    )
    rc.chmod(0o600)
    # Its own lock file: as root, fetchmail would share /var/run/fetchmail.pid.
    args = [fetchmail, "-f", str(rc), "--nosyslog", "--idfile", str(tmp_path / "ids"),
            "--pidfile", str(tmp_path / "fetchmail.pid")]  # fmt: skip
    first = run(args, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    fetched = sorted(p.read_bytes() for p in out.iterdir())
    assert len(fetched) == 3
    assert all(b"Subject: fetch " in m for m in fetched)
    assert server.messages(ALICE) == []  # deleted on the server
    again = run(args, tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr  # 1: no mail
