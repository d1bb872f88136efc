"""Inbound TLS as the world sees it: Mozilla's "intermediate" profile on the
implicit-TLS listeners, the whole chain served, and our MTA-STS policy.

The server's [tls] cert is a fullchain (leaf, then an intermediate CA) of a
test root.  sslscan lists every protocol and suite the submissions and
imaps listeners accept: only TLS 1.2 and 1.3, only forward-secret AEAD
suites (no CBC, RC4, 3DES, NULL, export).  ``openssl s_client -tls1_1`` is
refused; with only the root trusted, s_client verifies the chain, so the
intermediate was sent (two certificates shown).  curl fetches
https://mta-sts.example.test/.well-known/mta-sts.txt, verifying the
certificate, and gets the policy (RFC 8461 §3.2).
"""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator

import pytest

from tests.support.certs import Pki, make_pki
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

HOST = "mail.example.test"
MTA_STS = "mta-sts.example.test"
# What Mozilla's intermediate profile allows on TLS 1.2 (OpenSSL names), and TLS 1.3's suites.
TLS12_SUITES = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
}
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), [HOST, MTA_STS], intermediate=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[PostofficeServer]:
    https = free_port(("127.0.0.1",))
    srv = PostofficeServer(
        tmp_path_factory.mktemp("server"),
        hostname=HOST,
        sections={
            "listen": {"https": [f"127.0.0.1:{https}"]},
            "tls": {"cert": str(pki.cert), "key": str(pki.key)},
            "mta_sts": {"mode": "testing", "max_age": 86400},
        },
    )
    srv.ports["https"] = https
    srv.start()
    yield srv
    srv.stop()


def s_client(openssl: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST, *args],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("listener", ["submissions", "imaps"])
def test_only_tls12_and_13_with_strong_suites(
    server: PostofficeServer, listener: str, require_program: Callable[[str], str]
) -> None:
    sslscan = require_program("sslscan")
    result = subprocess.run(
        [sslscan, "--xml=-", "--no-colour", f"127.0.0.1:{server.ports[listener]}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    root = ET.fromstring(result.stdout[result.stdout.index("<?xml") :])
    enabled = {
        f"{p.get('type')}{p.get('version')}"
        for p in root.iter("protocol")
        if p.get("enabled") == "1"
    }
    assert enabled == {"tls1.2", "tls1.3"}, enabled
    accepted = {(c.get("sslversion"), c.get("cipher")) for c in root.iter("cipher")}
    assert accepted, result.stdout
    for version, suite in accepted:
        allowed = TLS13_SUITES if version == "TLSv1.3" else TLS12_SUITES
        assert version in ("TLSv1.2", "TLSv1.3") and suite in allowed, (version, suite)
    # Forward secrecy on 1.2 (ECDHE), and no group under the profile's floor
    # (2048-bit finite-field DH, ffdhe2048, is 112 bits; the EC groups more).
    assert ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256") in accepted
    groups = list(root.iter("group"))
    assert groups
    for group in groups:
        assert int(group.get("bits") or 0) >= 112, group.attrib


@pytest.mark.parametrize("listener", ["submissions", "imaps"])
def test_tls11_refused_and_the_whole_chain_served(
    server: PostofficeServer, pki: Pki, listener: str, require_program: Callable[[str], str]
) -> None:
    openssl = require_program("openssl")
    port = server.ports[listener]
    old = s_client(openssl, port, "-tls1_1")
    assert "Cipher is (NONE)" in old.stdout or old.returncode != 0, old.stdout
    assert "BEGIN CERTIFICATE" not in old.stdout
    # Only the root is trusted: verification needs the intermediate from the server.
    now = s_client(openssl, port, "-tls1_2", "-showcerts", "-CAfile", str(pki.ca))
    assert "Verify return code: 0 (ok)" in now.stdout, now.stdout
    assert now.stdout.count("-----BEGIN CERTIFICATE-----") == 2, now.stdout
    assert re.search(r"1 s:CN\s*=\s*postoffice test intermediate CA", now.stdout), now.stdout


def test_mta_sts_policy_served(
    server: PostofficeServer, pki: Pki, require_program: Callable[[str], str]
) -> None:
    curl = require_program("curl")
    port = server.ports["https"]

    def fetch(host: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                curl,
                "--silent",
                "--show-error",
                "--include",
                "--cacert",
                str(pki.ca),
                "--resolve",
                f"{host}:{port}:127.0.0.1",
                f"https://{host}:{port}/.well-known/mta-sts.txt",
            ],
            capture_output=True,
            timeout=30,
        )

    found = fetch(MTA_STS)
    assert found.returncode == 0, found.stderr
    head, _, body = found.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    assert re.search(r"(?im)^content-type: text/plain\s*$", head), head
    assert body == (
        "version: STSv1\r\nmode: testing\r\nmx: mail.example.test\r\nmax_age: 86400\r\n"
    )
    # Only for mta-sts.<local domain>: the hostname itself has no policy.
    other = fetch(HOST)
    assert other.stdout.startswith(b"HTTP/1.1 404"), other.stdout
