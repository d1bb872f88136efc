"""pebble, the ACME test CA (Debian's package), on loopback for the ACME tests.

pebble validates a challenge by looking the name up through ``-dnsserver``
(the test's dnsmasq, which points every name at 127.0.0.1) and connecting to
``httpPort`` (http-01) or ``tlsPort`` (tls-alpn-01): the test sets those to
the server's [listen] http and https ports.  Its own directory is served over
TLS with a certificate the test makes (tests/support/certs.py); the roots it
issues from are random per run and fetched from its management port.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.certs import make_pki
from tests.support.ports import free_port


class Pebble:
    def __init__(
        self,
        root: Path,
        *,
        dns_server: str,
        http_port: int,
        tls_port: int,
        validity_seconds: int = 0,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        pki = make_pki(root / "pebble-tls", ["localhost"])
        self.directory_ca = pki.ca  # what [acme] ca_bundle trusts
        self.port = free_port(("127.0.0.1",))
        self.management_port = free_port(("127.0.0.1",))
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(pki.cert),
            "privateKey": str(pki.key),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if validity_seconds:
            config["certificateValidityPeriod"] = validity_seconds
        self.config = root / "pebble-config.json"
        self.config.write_text(json.dumps({"pebble": config}))
        self.dns_server = dns_server
        self.log = root / "pebble.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def start(self, pebble: str = "pebble") -> Pebble:
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # validate at once, not after a random wait
            "PEBBLE_VA_ALWAYS_VALID": "0",  # really fetch the challenge
            "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce retries
            "PEBBLE_AUTHZREUSE": "0",  # every order proves control again
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [pebble, "-config", str(self.config), "-dnsserver", self.dns_server],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pebble exited:\n{self.log.read_text()}")
            try:
                self._get(f"https://localhost:{self.port}/dir")
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"pebble never answered:\n{self.log.read_text()}")

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.directory_ca))
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            body: bytes = response.read()
            return body

    def issuing_root(self, path: Path) -> Path:
        """pebble's root certificate (PEM), what clients verify its certificates by."""
        path.write_bytes(self._get(f"https://localhost:{self.management_port}/roots/0"))
        return path

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
