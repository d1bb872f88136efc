"""A DNSSEC lab on loopback: a zone signed with ldns-signzone, validated by unbound.

One unbound process does both jobs: an ``auth-zone`` with ``for-upstream:
yes`` (and ``for-downstream: no``) hands the zone file to unbound's own
iterator as if an authoritative server had answered, so the validator checks
its signatures against the ``trust-anchor-file`` (the zone's DS, from
ldns-keygen) and sets the AD bit on what it could authenticate (RFC 4035
§3.2.3).  Clients only ever talk to the validating side, as a mail server
would talk to its local resolver.

Three zones a test can ask for: ``signed`` (secure answers, AD set),
unsigned (no trust anchor: insecure, no AD), and ``bogus`` (signed, but the
anchor is another key's DS: every answer is SERVFAIL).

unbound knows ``test.`` as a locally served empty zone (RFC 6761); the
config turns that off so the auth-zone is reached.  Started and stopped by
its PID, listening on 127.0.0.1 only, everything in ``root``.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.helpers import wait_for
from tests.support.ports import free_port

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
LDNS_KEYGEN = shutil.which("ldns-keygen") or "/usr/bin/ldns-keygen"
LDNS_SIGNZONE = shutil.which("ldns-signzone") or "/usr/bin/ldns-signzone"


def spki_sha256(cert_pem: bytes) -> str:
    """The data of a TLSA 3 1 1 (or 2 1 1) record for the (first) certificate in ``cert_pem``."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


class DnssecLab:
    """unbound on 127.0.0.1:<port>, serving and validating ``zone``.

    ``records``: zone-file lines relative to the zone (``"mx IN A 127.0.0.2"``);
    SOA and NS are added.  ``mode``: "signed", "unsigned" or "bogus"."""

    def __init__(
        self, root: Path, zone: str, records: Sequence[str], *, mode: str = "signed"
    ) -> None:
        if mode not in ("signed", "unsigned", "bogus"):
            raise ValueError(mode)
        self.root, self.zone, self.mode = root, zone.rstrip("."), mode
        self.records = list(records)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "unbound.log"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _zone_file(self) -> Path:
        """The zone as unbound loads it (signed when ``mode`` asks), and the anchor."""
        zone = self.zone
        text = "\n".join(
            [
                f"$ORIGIN {zone}.",
                "$TTL 300",
                f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 300",
                f"@ IN NS ns.{zone}.",
                "ns IN A 127.0.0.1",
                *self.records,
                "",
            ]
        )
        path = self.root / f"{zone}.zone"
        path.write_text(text)
        if self.mode == "unsigned":
            return path
        key = self._keygen(zone)
        subprocess.run(
            [LDNS_SIGNZONE, "-n", "-o", zone, str(path), str(key)],
            cwd=self.root,
            check=True,
            capture_output=True,
        )
        if self.mode == "signed":
            shutil.copy(self.root / f"{key.name}.ds", self.root / "anchor.ds")
        else:
            # Another key of the same name: its DS cannot validate the zone.
            other = self._keygen(zone)
            shutil.copy(self.root / f"{other.name}.ds", self.root / "anchor.ds")
        return self.root / f"{zone}.zone.signed"

    def _keygen(self, zone: str) -> Path:
        # One ECDSA P-256 key as KSK and ZSK at once (ldns-signzone signs with it).
        out = subprocess.run(
            [LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", zone],
            cwd=self.root,
            check=True,
            capture_output=True,
            text=True,
        )
        return self.root / out.stdout.strip()

    def _config(self, zone_file: Path) -> Path:
        anchor = (
            f'  trust-anchor-file: "{self.root / "anchor.ds"}"\n' if self.mode != "unsigned" else ""
        )
        conf = self.root / "unbound.conf"
        conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1@{self.port}\n"
            f"  port: {self.port}\n"
            "  do-ip6: no\n"
            "  do-daemonize: no\n"
            '  username: ""\n'
            '  chroot: ""\n'
            f'  directory: "{self.root}"\n'
            f'  pidfile: "{self.root / "unbound.pid"}"\n'
            "  use-syslog: no\n"
            "  verbosity: 1\n"
            "  val-log-level: 2\n"
            "  do-not-query-localhost: no\n"
            '  module-config: "validator iterator"\n'
            "  access-control: 127.0.0.0/8 allow\n"
            '  local-zone: "test." nodefault\n' + anchor + "auth-zone:\n"
            f'  name: "{self.zone}"\n'
            f'  zonefile: "{zone_file}"\n'
            "  for-downstream: no\n"
            "  for-upstream: yes\n"
            "  fallback-enabled: no\n"
            "remote-control:\n"
            "  control-enable: no\n"
        )
        return conf

    def _answers(self) -> bool:
        query = dns.message.make_query(f"{self.zone}.", dns.rdatatype.SOA)
        try:
            dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        return True

    def start(self) -> DnssecLab:
        zone_file = self._zone_file()
        for _ in range(5):  # the free port may be taken before unbound binds it
            self.port = free_port(("127.0.0.1",), socket.SOCK_DGRAM)
            conf = self._config(zone_file)
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [UNBOUND, "-d", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
                )
            if wait_for(lambda: self._answers() or self._exited(), 10) and not self._exited():
                return self
            self.stop()
            time.sleep(0.2)
        raise RuntimeError(f"unbound did not start: {self.log.read_text()[-2000:]}")

    def _exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
