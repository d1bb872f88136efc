"""OpenDKIM (Debian's opendkim, milter mode, verifying) behind our milter
client: a message signed with a key published in a test dnsmasq gets
``Authentication-Results: ... dkim=pass``; the same message with its body
changed gets ``dkim=fail``, so the test can fail."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postoffice.filters import verdicts as v
from postoffice.filters.interface import SpooledMessage
from tests.integration.filters.milter_support import spool, transaction
from tests.support.dns import auth_dns
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port

pytestmark = pytest.mark.interop

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
SELECTOR, DOMAIN = "milter", "signer.example.test"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def opendkim(tmp_path_factory: pytest.TempPathFactory, key: rsa.RSAPrivateKey) -> Iterator[str]:
    """opendkim -f on a loopback port; keys from a dnsmasq via libunbound."""
    root = tmp_path_factory.mktemp("opendkim")
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    dns: Dnsmasq = auth_dns(root, txt={f"{SELECTOR}._domainkey.{DOMAIN}": record}).start()
    (root / "unbound.conf").write_text(
        "server:\n"
        "  do-not-query-localhost: no\n"
        '  module-config: "iterator"\n'
        '  local-zone: "test." nodefault\n'
        "forward-zone:\n"
        '  name: "test."\n'
        f"  forward-addr: 127.0.0.1@{dns.port}\n"
    )
    port = free_port()
    (root / "opendkim.conf").write_text(
        "Mode v\nSyslog no\nBackground no\nAuthservID verifier.test\n"
        f"ResolverConfiguration {root / 'unbound.conf'}\n"
        f"Socket inet:{port}@127.0.0.1\nPidFile {root / 'opendkim.pid'}\n"
        # 127.0.0.1 is "internal" by default, whose mail is signed, not verified.
        "InternalHosts csl:192.0.2.250\n"
    )
    log = open(root / "opendkim.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [OPENDKIM, "-f", "-x", str(root / "opendkim.conf")], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.2)
        assert proc.poll() is None, (root / "opendkim.log").read_text()
        yield f"inet:127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        dns.stop()


def signed(key: rsa.RSAPrivateKey) -> bytes:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    message = (
        f"From: Sender <sender@{DOMAIN}>\r\n"
        "To: rcpt@example.test\r\n"
        "Subject: signed for the milter test\r\n"
        "Date: Sun, 06 Dec 2026 02:00:00 +0000\r\n"
        f"Message-ID: <dkim-milter@{DOMAIN}>\r\n"
        "\r\n" + "A body line that is signed.\r\n" * 50
    ).encode()
    signature = dkim.sign(
        message, SELECTOR.encode(), DOMAIN.encode(), pem, include_headers=[b"from", b"subject"]
    )
    return signature + message


def as_spooled(tmp: Path, raw: bytes) -> SpooledMessage:
    """Split a CRLF message into the spool's LF form and header list."""
    text = raw.replace(b"\r\n", b"\n").decode()
    head, _, body = text.partition("\n\n")
    headers: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value[1:] if value.startswith(" ") else value))
    return spool(tmp, headers, body.encode())


def results_header(address: str, tmp: Path, raw: bytes) -> str:
    result = asyncio.run(transaction(address, as_spooled(tmp, raw)))[-1]
    assert result.verdict == v.ACCEPT
    found = [
        m.value
        for m in result.modifications
        if isinstance(m, v.AddHeader) and m.name == "Authentication-Results"
    ]
    assert len(found) == 1, result.modifications
    return found[0]


def test_opendkim_verifies_a_signed_message(
    opendkim: str, key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    raw = signed(key)
    good = results_header(opendkim, tmp_path, raw)
    assert good.startswith("verifier.test")
    assert "dkim=pass" in good and f"header.d={DOMAIN}" in good
    bad = results_header(opendkim, tmp_path, raw.replace(b"signed.", b"changed"))
    assert "dkim=fail" in bad or "dkim=neutral" in bad, bad
