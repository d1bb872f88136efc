"""The default self-signed certificate is a server leaf, not a CA (issue #11, item 12).

A client told to trust it (msmtp's ``tls_trust_file``, curl's ``--cacert``)
must not thereby trust whatever its key might sign: CA:FALSE, key usages of
a TLS server, the server-auth EKU only, and the names it is reached by.
Checked with the ``cryptography`` API, with ``openssl x509 -text`` as an
administrator would read it, and by verifying it as a pinned trust anchor
for the TLS-server purpose (openssl verify and Python's ssl).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from postoffice.net.tls import ensure_self_signed, server_context


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path_factory.mktemp("tls"), "mail.example.test")


def test_the_certificate_is_a_server_leaf(pair: tuple[Path, Path]) -> None:
    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    ext = cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    assert not (usage.value.content_commitment or usage.value.data_encipherment)
    assert not usage.value.key_agreement
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def openssl(require_program, *args: str) -> str:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [require_program("openssl"), *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_openssl_reads_a_leaf_for_tls_servers(pair: tuple[Path, Path], require_program) -> None:  # type: ignore[no-untyped-def]
    text = openssl(require_program, "x509", "-in", str(pair[0]), "-noout", "-text")
    lines = [line.strip() for line in text.splitlines()]
    after = {name: lines[lines.index(name) + 1] for name in (
        "X509v3 Basic Constraints: critical",
        "X509v3 Key Usage: critical",
        "X509v3 Extended Key Usage:",
        "X509v3 Subject Alternative Name:",
    )}  # fmt: skip
    assert after["X509v3 Basic Constraints: critical"] == "CA:FALSE"
    assert after["X509v3 Key Usage: critical"] == "Digital Signature, Key Encipherment"
    assert after["X509v3 Extended Key Usage:"] == "TLS Web Server Authentication"
    assert after["X509v3 Subject Alternative Name:"] == (
        "DNS:mail.example.test, DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1"
    )
    assert "CA:TRUE" not in text
    # Pinned as the only trust anchor, it verifies for the TLS-server purpose.
    out = openssl(require_program, "verify", "-x509_strict", "-purpose", "sslserver",
                  "-CAfile", str(pair[0]), str(pair[0]))  # fmt: skip
    assert out.strip().endswith(": OK")


def test_a_client_pinning_the_certificate_connects_by_name(pair: tuple[Path, Path]) -> None:
    server_ctx = server_context(*pair)
    client_ctx = ssl.create_default_context(cafile=str(pair[0]))  # verifies name and chain
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(10)
