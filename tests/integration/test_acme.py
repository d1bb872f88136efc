"""ACME certificates (RFC 8555) from a real pebble on loopback.

pebble resolves every name through the test's dnsmasq (all of them point at
127.0.0.1) and fetches http-01 challenges from the server's [listen] http
port.  curl verifies the issued certificate against pebble's issuing root
on the implicit-TLS listeners (465-, 993- and 995-style).
"""

from __future__ import annotations

import datetime
import imaplib
import os
import re
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support.dns import auth_dns, start_keeping_port
from tests.support.pebble import Pebble
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

HOST = "mail.example.test"
NAMES = (HOST, "mta-sts.example.test", "autoconfig.example.test")
INSTALLED = "ACME: new certificate in the TLS listeners"


def wait_for_log(server: PostofficeServer, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.log().count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} x{count} not logged:\n{server.log()}")


def served_certificate(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@pytest.fixture
def dnsmasq(tmp_path: Path, require_program: Callable[[str], str]) -> Iterator[Dnsmasq]:
    require_program("dnsmasq")
    server = start_keeping_port(auth_dns(tmp_path, hosts={n: ["127.0.0.1"] for n in NAMES}))
    yield server
    server.stop()


def acme_server(
    tmp_path: Path, directory: str, ca_bundle: Path, web: dict[str, int]
) -> PostofficeServer:
    listen = {name: [f"127.0.0.1:{port}"] for name, port in web.items()}
    server = PostofficeServer(
        tmp_path,
        hostname=HOST,
        sections={
            "listen": listen,
            "acme": {
                "directory": directory,
                "email": "postmaster@example.test",
                "ca_bundle": str(ca_bundle),
            },
        },
    )
    # No self-signed pair from the test cache: the server makes its own.
    for name in ("cert.pem", "key.pem"):
        (server.data_dir / "tls" / name).unlink()
    server.add_user("alice@example.test", "alice-password-1")
    return server


def curl(curl_bin: str, root: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    host_port = url.split("//")[1].split("/")[0]
    port = host_port.split(":")[1]
    return subprocess.run(
        [
            curl_bin,
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--resolve",
            f"{HOST}:{port}:127.0.0.1",
            "--cacert",
            str(root),
            "--user",
            "alice@example.test:alice-password-1",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.interop
def test_issued_at_start_verified_by_curl_and_renewed_under_a_session(
    tmp_path: Path, dnsmasq: Dnsmasq, require_program: Callable[[str], str]
) -> None:
    curl_bin = require_program("curl")
    web = {"http": free_port(), "https": free_port()}
    # Short-lived certificates: renewed at 2/3 of 30 s, while the test watches.
    pebble = Pebble(
        tmp_path / "pebble",
        dns_server=dnsmasq.server,
        http_port=web["http"],
        tls_port=web["https"],
        validity_seconds=30,
    ).start(require_program("pebble"))
    try:
        server = acme_server(tmp_path / "po", pebble.directory, pebble.directory_ca, web)
        server.start()
        try:
            assert "serving a self-signed certificate until the CA issues one" in server.log()
            wait_for_log(server, INSTALLED)
            root = pebble.issuing_root(tmp_path / "pebble-root.pem")

            issued = server.data_dir / "acme" / "certificate.pem"
            assert stat.S_IMODE(issued.stat().st_mode) == 0o600
            key = server.data_dir / "acme" / "account.key"
            assert stat.S_IMODE(key.stat().st_mode) == 0o600

            ports = server.ports
            message = tmp_path / "message.eml"
            message.write_text("From: alice@example.test\r\nSubject: acme\r\n\r\nhello\r\n")
            runs = {
                "submissions": curl(
                    curl_bin,
                    root,
                    f"smtps://{HOST}:{ports['submissions']}",
                    "--mail-from",
                    "alice@example.test",
                    "--mail-rcpt",
                    "alice@example.test",
                    "--upload-file",
                    str(message),
                ),
                "imaps": curl(curl_bin, root, f"imaps://{HOST}:{ports['imaps']}/"),
                "pop3s": curl(curl_bin, root, f"pop3s://{HOST}:{ports['pop3s']}/"),
            }
            for name, run in runs.items():
                assert run.returncode == 0, f"{name}: {run.returncode} {run.stderr}"
            # The test can fail: the same curl without pebble's root refuses.
            untrusted = curl(
                curl_bin, tmp_path / "message.eml", f"imaps://{HOST}:{ports['imaps']}/"
            )
            assert untrusted.returncode in (60, 77), untrusted

            first = served_certificate(ports["imaps"])
            names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert set(names.value.get_values_for_type(x509.DNSName)) == set(NAMES)

            status = server.cli("cert", "status").stdout
            assert "(acme)" in status, status
            for name in NAMES:
                assert name in status
            assert "Pebble" in status
            assert re.search(r"next renewal \d{4}-\d\d-\d\dT", status), status
            assert first.not_valid_after_utc.isoformat(timespec="seconds") in status

            # An IMAP session opened on the first certificate stays up across renewal.
            ctx = ssl.create_default_context(cafile=str(root))
            ctx.check_hostname = False  # 127.0.0.1, not the name; the chain is checked
            imap = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=ctx, timeout=10)
            imap.login("alice@example.test", "alice-password-1")
            wait_for_log(server, INSTALLED, count=2, timeout=60)
            renewed = served_certificate(ports["imaps"])
            assert renewed.serial_number != first.serial_number
            assert renewed.not_valid_after_utc > first.not_valid_after_utc
            # The key stays (a TLSA 3 1 1 record names it: DANE, RFC 7671 §5.1).
            assert renewed.public_key() == first.public_key()
            assert imap.noop()[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"
            imap.logout()
            again = curl(curl_bin, root, f"pop3s://{HOST}:{ports['pop3s']}/")
            assert again.returncode == 0, again.stderr
        finally:
            server.stop()
    finally:
        pebble.stop()


@pytest.mark.interop
def test_tls_alpn_01_on_https_when_there_is_no_http_listener(
    tmp_path: Path, dnsmasq: Dnsmasq, require_program: Callable[[str], str]
) -> None:
    curl_bin = require_program("curl")
    web = {"https": free_port()}
    pebble = Pebble(
        tmp_path / "pebble",
        dns_server=dnsmasq.server,
        http_port=free_port(),  # nothing there: only tls-alpn-01 can pass
        tls_port=web["https"],
    ).start(require_program("pebble"))
    try:
        server = acme_server(tmp_path / "po", pebble.directory, pebble.directory_ca, web)
        server.start()
        try:
            wait_for_log(server, INSTALLED)
            assert "/.well-known/acme-challenge/" not in server.log()
            root = pebble.issuing_root(tmp_path / "pebble-root.pem")
            run = curl(curl_bin, root, f"imaps://{HOST}:{server.ports['imaps']}/")
            assert run.returncode == 0, run.stderr
            # The https listener serves the issued certificate again, not a challenge one.
            https = subprocess.run(
                [
                    curl_bin,
                    "--silent",
                    "--show-error",
                    "--max-time",
                    "10",
                    "--output",
                    "/dev/null",
                    "--resolve",
                    f"autoconfig.example.test:{web['https']}:127.0.0.1",
                    "--cacert",
                    str(root),
                    f"https://autoconfig.example.test:{web['https']}/mail/config-v1.1.xml",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert https.returncode == 0, https.stderr
        finally:
            server.stop()
    finally:
        pebble.stop()


@pytest.mark.interop
def test_an_expired_certificate_is_served_at_start_then_replaced(
    tmp_path: Path, dnsmasq: Dnsmasq, require_program: Callable[[str], str]
) -> None:
    web = {"http": free_port(), "https": free_port()}
    pebble = Pebble(
        tmp_path / "pebble", dns_server=dnsmasq.server, http_port=web["http"], tls_port=web["https"]
    ).start(require_program("pebble"))
    try:
        server = acme_server(tmp_path / "po", pebble.directory, pebble.directory_ca, web)
        old = expired_chain(server.data_dir / "acme" / "certificate.pem")
        server.start()
        try:
            wait_for_log(server, INSTALLED)
            log = server.log()
            assert "no certificate yet" not in log  # the expired one served meanwhile
            assert "(it has expired)" in log, log
            new = served_certificate(server.ports["imaps"])
            assert new.serial_number != old.serial_number
            assert "Pebble" in new.issuer.rfc4514_string()
        finally:
            server.stop()
    finally:
        pebble.stop()


def expired_chain(path: Path) -> x509.Certificate:
    """A key and a certificate for NAMES that ended yesterday, where net/acme.py keeps its own."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), False)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem + cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o600)
    return cert


def test_ca_unreachable_at_start_serves_self_signed(
    tmp_path: Path, require_program: Callable[[str], str]
) -> None:
    ca = tmp_path / "nobody-ca.pem"
    ca.write_text("")
    web = {"http": free_port(), "https": free_port()}
    closed = free_port()  # nothing listens there
    server = acme_server(tmp_path, f"https://localhost:{closed}/dir", ca, web)
    server.start()
    try:
        wait_for_log(server, "ACME: order for")
        log = server.log()
        assert "serving a self-signed certificate until the CA issues one" in log
        failed = next(line for line in log.splitlines() if "ACME: order for" in line)
        assert "ERROR" in failed and "keeping the current certificate" in failed, failed
        cert = served_certificate(server.ports["imaps"])
        assert cert.issuer == cert.subject  # the self-signed pair
        status = server.cli("cert", "status").stdout
        assert "(self-signed)" in status and "none issued yet" in status, status
        assert "last error" in status and "next renewal" in status, status
        assert os.path.isfile(server.data_dir / "tls" / "cert.pem")
    finally:
        server.stop()
