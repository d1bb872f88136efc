"""The first command after the TLS handshake is answered, with every real client (issue #11, item 1).

A TLS 1.3 client may send its first command in the same flight as its
Finished.  The server used to throw away whatever it had received when the
handshake completed, so that command was never answered: msmtp (GnuTLS)
hung on every STARTTLS, curl's POP3 STLS on some fetches, gnutls-cli on
every command typed at once.  Python's smtplib and swaks never hit it,
which is why the rest of the suite did not notice.

Each client runs in a loop (counts from the issue), each run bounded by its
own timeout and a subprocess timeout; a run that does not finish is a hang,
and the test wants none.  The server runs once on asyncio's own loop and
once on uvloop (tests/support/loops.py): they deliver the bytes that follow
the handshake at different moments.  Outside CI a missing program skips its
test; in CI it fails.
"""

from __future__ import annotations

import os
import select
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, ALICE_PW, BOB
from tests.support.loops import LOOPS, runs_uvloop, server_env
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

PARALLEL = 4  # clients at once: some load, as on a real server
RUN_TIMEOUT = 20.0  # seconds for one client run before it counts as hung


@pytest.fixture(scope="module", params=LOOPS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostofficeServer]:
    root = tmp_path_factory.mktemp(f"first-command-{request.param}")
    # Two smtp processes: port 25 is then accepted the way a listener shared
    # between processes accepts (Listener._adopt), and STARTTLS is tried there too.
    srv = PostofficeServer(root, sections={"limits": {"smtp_processes": 2}})
    srv.add_user(ALICE, ALICE_PW)
    srv.add_user(BOB, "bob-password-2")
    srv.start(env=server_env(request.param, root))
    assert srv.proc is not None
    assert runs_uvloop(srv.proc.pid) == (request.param == "uvloop")
    yield srv
    srv.stop()


@dataclass
class Tally:
    ok: int = 0
    hung: int = 0
    failed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.ok} ok, {self.hung} hung, {len(self.failed)} failed {self.failed[:3]}"


def loop(count: int, run: Callable[[int], tuple[bool, str]], parallel: int = PARALLEL) -> Tally:
    """``run(i)`` ``count`` times, ``parallel`` at once; each returns (ok,
    detail) or raises subprocess.TimeoutExpired (hung)."""
    tally = Tally()

    def one(i: int) -> None:
        try:
            ok, detail = run(i)
        except subprocess.TimeoutExpired:
            tally.hung += 1
            return
        if ok:
            tally.ok += 1
        else:
            tally.failed.append(detail)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(count)))
    return tally


def cert(srv: PostofficeServer) -> str:
    return str(srv.data_dir / "tls" / "cert.pem")


def run(
    args: list[str], home: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        check=False,
    )


# --- msmtp (GnuTLS): 587 STARTTLS and 465 ------------------------------------------


@pytest.mark.parametrize("account", ["starttls", "implicit"])
def test_msmtp_never_hangs(
    server: PostofficeServer, require_program, tmp_path: Path, account: str
) -> None:  # type: ignore[no-untyped-def]
    msmtp = require_program("msmtp")
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"defaults\nhost 127.0.0.1\nauth on\nuser {ALICE}\npassword {ALICE_PW}\n"
        f"from {ALICE}\ntls on\ntls_trust_file {cert(server)}\n"
        "tls_host_override localhost\ntimeout 10\n\n"
        f"account starttls\nport {server.ports['submission']}\ntls_starttls on\n\n"
        f"account implicit\nport {server.ports['submissions']}\ntls_starttls off\n"
    )
    rc.chmod(0o600)
    before = len(server.messages(BOB))

    def send(i: int) -> tuple[bool, str]:
        message = f"From: {ALICE}\nTo: {BOB}\nSubject: {account} {i}\n\nHello.\n".encode()
        result = run([msmtp, "-C", str(rc), "-a", account, "-t"], tmp_path, message)
        return result.returncode == 0, result.stderr.decode(errors="replace")[-200:]

    tally = loop(40, send)
    assert (tally.ok, tally.hung, tally.failed) == (40, 0, []), str(tally)
    assert len(server.messages(BOB)) == before + 40


# --- curl: POP3 with STLS -------------------------------------------------------------


def test_curl_pop3_stls_never_hangs(
    server: PostofficeServer, require_program, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    curl = require_program("curl")
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as smtp:
        smtp.sendmail("friend@remote.test", [ALICE], b"Subject: to fetch\r\n\r\nHello.\r\n")
    url = f"pop3://127.0.0.1:{server.ports['pop3']}/1"
    args = [curl, "-sS", "--max-time", "10", "--ssl-reqd", "--cacert", cert(server),
            "-u", f"{ALICE}:{ALICE_PW}", url]  # fmt: skip

    def fetch(_: int) -> tuple[bool, str]:
        result = run(args, tmp_path)
        if result.returncode == 28:  # CURLE_OPERATION_TIMEDOUT: curl's own --max-time
            raise subprocess.TimeoutExpired(args, 10)
        ok = result.returncode == 0 and b"Subject: to fetch" in result.stdout
        return ok, f"rc={result.returncode} {result.stderr.decode(errors='replace')[-200:]}"

    tally = loop(100, fetch, parallel=1)  # one mailbox: one session at a time (RFC 1939 §8)
    assert (tally.ok, tally.hung, tally.failed) == (100, 0, []), str(tally)


# --- openssl s_client and gnutls-cli: commands typed at once ----------------------------


def interactive(args: list[str], commands: bytes, until: bytes) -> tuple[bool, str]:
    """Start a TLS client, write ``commands`` at once (it sends them as soon as
    its handshake is done) and keep its stdin open (gnutls-cli quits at end of
    input without waiting for answers) until ``until`` is in its output;
    raise TimeoutExpired if it is not there within RUN_TIMEOUT."""
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    try:
        proc.stdin.write(commands)
        proc.stdin.flush()
        deadline = time.monotonic() + RUN_TIMEOUT
        while until not in out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(args, RUN_TIMEOUT, out)
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break  # the client ended without it
                out += chunk
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    return until in out, out.decode(errors="replace")[-300:]


@pytest.mark.parametrize("port", ["submission", "smtp"])
def test_openssl_s_client_starttls_tls13(
    server: PostofficeServer, require_program, port: str
) -> None:  # type: ignore[no-untyped-def]
    openssl = require_program("openssl")
    args = [openssl, "s_client", "-starttls", "smtp", "-tls1_3", "-crlf", "-quiet",
            "-connect", f"127.0.0.1:{server.ports[port]}"]  # fmt: skip
    # s_client's own EHLO was "openssl.client.net"; ours comes inside TLS.
    tally = loop(
        20, lambda _: interactive(args, b"EHLO client.test\nQUIT\n", b"greets client.test")
    )
    assert (tally.ok, tally.hung, tally.failed) == (20, 0, []), str(tally)


@pytest.mark.parametrize("port", ["submission", "smtp", "pop3"])
def test_gnutls_cli_starttls(server: PostofficeServer, require_program, port: str) -> None:  # type: ignore[no-untyped-def]
    gnutls = require_program("gnutls-cli")
    proto = "pop3" if port == "pop3" else "smtp"
    args = [gnutls, "--x509cafile", cert(server), "--starttls-proto", proto, "--crlf",
            "--port", str(server.ports[port]), "localhost"]  # fmt: skip
    if proto == "smtp":
        commands, until = b"EHLO client.test\nQUIT\n", b"greets client.test"
    else:
        commands, until = b"CAPA\nQUIT\n", b"IMPLEMENTATION"
    started = time.monotonic()
    tally = loop(20, lambda _: interactive(args, commands, until))
    assert (tally.ok, tally.hung, tally.failed) == (20, 0, []), str(tally)
    assert time.monotonic() - started < 20 * RUN_TIMEOUT
