"""Reload without a restart (#15): ``kill -HUP`` and ``postoffice reload`` swap
the certificate, limits and listen addresses while sessions stay up; a bad
config is refused with its reason and the running one stays."""

from __future__ import annotations

import hashlib
import imaplib
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from postoffice.net.tls import ensure_self_signed
from tests.support.helpers import smtp_processes, wait_for
from tests.support.ports import free_port
from tests.support.server import PostofficeServer, cached_tls_dir

ALICE, PASSWORD = "alice@example.test", "alice-password-1"


def fingerprint(port: int, starttls: bool = False) -> str:
    """SHA-256 of the certificate a new TLS connection to ``port`` is shown."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if starttls:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls(context=ctx)
            assert isinstance(smtp.sock, ssl.SSLSocket)
            der = smtp.sock.getpeercert(binary_form=True)
    else:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def ehlo_size(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.example.test")
        return int(smtp.esmtp_features["size"])


def rewrite(srv: PostofficeServer, old: str, new: str) -> None:
    text = srv.config.read_text()
    assert old in text
    srv.config.write_text(text.replace(old, new))


def reloaded(srv: PostofficeServer, count: int) -> bool:
    return srv.log().count("SIGHUP: reloaded") >= count


@pytest.fixture
def tls_server(tmp_path: Path) -> Any:
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("cert.pem", "key.pem"):
        shutil.copyfile(cached_tls_dir() / name, tls / name)
    srv = PostofficeServer(
        tmp_path,
        sections={
            "tls": {"cert": str(tls / "cert.pem"), "key": str(tls / "key.pem")},
            "limits": {"max_message_size": 1000000},
        },
    )
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    try:
        yield srv, tls
    finally:
        srv.stop()


def test_kill_hup_swaps_a_certificate_while_a_session_stays_up(tls_server: Any) -> None:
    srv, tls = tls_server
    old_print = file_fingerprint(tls / "cert.pem")
    assert fingerprint(srv.ports["imaps"]) == old_print
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    imap = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=ctx, timeout=10)
    imap.login(ALICE, PASSWORD)
    imap.select("INBOX")
    smtp = smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10)
    smtp.ehlo("client.example.test")
    assert smtp.esmtp_features["size"] == "1000000"

    # A new certificate and key in place, a new limit: then SIGHUP.
    with tempfile.TemporaryDirectory() as fresh:
        cert, key = ensure_self_signed(Path(fresh), "mail.example.test")
        shutil.copyfile(key, tls / "key.pem")
        shutil.copyfile(cert, tls / "cert.pem")
    new_print = file_fingerprint(tls / "cert.pem")
    assert new_print != old_print
    rewrite(srv, "max_message_size = 1000000", "max_message_size = 2000000")
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: reloaded(srv, 1)), srv.log()

    # New connections: the new certificate (implicit TLS and STARTTLS), the new SIZE.
    assert fingerprint(srv.ports["imaps"]) == new_print
    assert fingerprint(srv.ports["pop3s"]) == new_print
    assert fingerprint(srv.ports["submission"], starttls=True) == new_print
    assert ehlo_size(srv.ports["smtp"]) == 2000000
    # The sessions opened before are still up, the IMAP one on its old certificate.
    assert imap.noop()[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    sock = imap.socket()
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None and hashlib.sha256(der).hexdigest() == old_print
    assert smtp.noop()[0] == 250
    smtp.mail("bob@elsewhere.test")
    assert smtp.rcpt(ALICE)[0] == 250
    assert smtp.data(b"Subject: across a reload\r\n\r\nstill here\r\n")[0] == 250
    smtp.quit()
    imap.logout()
    assert wait_for(lambda: len(srv.messages(ALICE)) == 1)
    assert srv.proc.poll() is None


def test_a_bad_config_is_refused_and_the_running_one_stays(tls_server: Any) -> None:
    srv, tls = tls_server
    before = fingerprint(srv.ports["imaps"])
    good = srv.config.read_text()
    # `postoffice reload` checks first: the reason is printed, nothing is sent.
    srv.config.write_text(good.replace("max_message_size = 1000000", "max_mesage_size = 5"))
    result = srv.cli("reload", check=False)
    assert result.returncode == 2  # a config error, as for every command
    assert "limits.max_mesage_size: unknown key" in result.stderr
    assert "SIGHUP" not in srv.log()
    # A SIGHUP sent anyway: the server refuses it with the reason, in its log.
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: "reload refused" in srv.log())
    assert "limits.max_mesage_size: unknown key" in srv.log()
    # A certificate that does not load is refused too.
    srv.config.write_text(good.replace("max_message_size = 1000000", "max_message_size = 7"))
    (tls / "cert.pem").write_text("not a certificate\n")
    result = srv.cli("reload", check=False)
    assert result.returncode == 1
    assert "TLS certificate or key" in result.stderr
    os.kill(srv.proc.pid, signal.SIGHUP)
    assert wait_for(lambda: srv.log().count("reload refused") == 2)
    assert ehlo_size(srv.ports["smtp"]) == 1000000
    assert fingerprint(srv.ports["imaps"]) == before
    assert srv.proc.poll() is None


def test_postoffice_reload_moves_a_listener_and_keeps_the_other_sessions(
    tmp_path: Path,
) -> None:
    srv = PostofficeServer(tmp_path)
    srv.add_user(ALICE, PASSWORD)
    srv.start()
    try:
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=10)
        pop = socket.create_connection(("127.0.0.1", srv.ports["pop3"]), timeout=10)
        assert pop.recv(512).startswith(b"+OK")
        old_port, new_port = srv.ports["pop3"], free_port()
        rewrite(srv, f'pop3 = ["127.0.0.1:{old_port}"]', f'pop3 = ["127.0.0.1:{new_port}"]')
        result = srv.cli("reload")
        assert "asked the server" in result.stdout
        assert wait_for(lambda: reloaded(srv, 1)), srv.log()
        assert f"pop3 listener now on 127.0.0.1:{new_port}" in srv.log()
        with socket.create_connection(("127.0.0.1", new_port), timeout=10) as fresh:
            assert fresh.recv(512).startswith(b"+OK")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=10)
        # The session on the old pop3 port and the one on imap are still up.
        pop.sendall(b"CAPA\r\n")
        assert pop.recv(512).startswith(b"+OK")
        assert imap.noop()[0] == "OK"
        imap.logout()
        pop.close()
    finally:
        srv.stop()


def test_every_smtp_process_reloads_and_a_moved_smtp_listener_gets_new_ones(
    tmp_path: Path,
) -> None:
    srv = PostofficeServer(tmp_path, sections={"limits": {"smtp_processes": 2}})
    srv.start()
    try:
        assert srv.proc is not None
        pid = srv.proc.pid
        assert wait_for(lambda: "smtp process 1 accepting" in srv.log())
        first = smtp_processes(pid)
        rewrite(srv, "[limits]", "[limits]\nmax_message_size = 3000000")
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: "smtp process reloaded" in srv.log()), srv.log()
        # Connections spread over both processes: every one sees the new SIZE.
        held = [smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=10) for _ in range(6)]
        for smtp in held:
            smtp.ehlo("client.example.test")
            assert smtp.esmtp_features["size"] == "3000000"
        # Move the smtp listener: the extra process is replaced, sessions finish.
        old_port, new_port = srv.ports["smtp"], free_port()
        rewrite(srv, f'smtp = ["127.0.0.1:{old_port}"]', f'smtp = ["127.0.0.1:{new_port}"]')
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: reloaded(srv, 2)), srv.log()
        assert ehlo_size(new_port) == 3000000
        for smtp in held:
            assert smtp.noop()[0] == 250
            smtp.quit()
        assert wait_for(lambda: srv.log().count("smtp process 1 accepting") == 2)
        assert len(smtp_processes(pid)) == 1 and smtp_processes(pid) != first
        for _ in range(6):
            assert ehlo_size(new_port) == 3000000
    finally:
        assert srv.stop() == 0


def test_reload_without_a_server_says_so(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path)
    srv.cli("init")
    result = subprocess.run(
        [sys.executable, "-m", "postoffice", "-c", str(srv.config), "reload"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no server runs on" in result.stderr
