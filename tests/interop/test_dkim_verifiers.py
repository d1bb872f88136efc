"""Mail signed by postoffice verifies with independent DKIM verifiers.

The real server signs a submitted message and relays it to Postfix's
smtp-sink; the message as it arrived there is checked by

* dkimpy's ``dkimverify`` script (each signature: RSA, then Ed25519), which
  reads the system resolver configuration: it runs in a private mount
  namespace (``unshare``) whose /etc/resolv.conf names a dnsmasq on
  127.53.x.y:53;
* OpenDKIM (``opendkim -t``, Debian's opendkim package), whose resolver
  (libunbound) is pointed at dnsmasq with a forward zone for ``test.``.

Both must also reject the message once its body is changed, so the test
can fail.  Keys are published from the lines ``postoffice dkim show`` prints.
"""

from __future__ import annotations

import random
import re
import smtplib
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.support.dns import auth_dns, start_keeping_port
from tests.support.helpers import wait_for
from tests.support.peers import SmtpSink
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

MX = "127.0.0.2"
ALICE = "alice@example.test"
LONG_LINE = b"=" * 20 + bytes(range(33, 127)) * 26 + b" x" * 18  # 2,500 octets


def txt_lines(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        if " IN TXT " in line:
            found[line.split(". IN TXT", 1)[0]] = "".join(re.findall(r'"([^"]*)"', line))
    return found


def answers(address: str, port: int) -> bool:
    query = dns.message.make_query("probe.test.", dns.rdatatype.A)
    try:
        dns.query.udp(query, address, port=port, timeout=0.5)
    except (OSError, dns.exception.Timeout):
        return False
    return True


@pytest.fixture(scope="module")
def signed_message(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[bytes, dict[str, str]]]:
    """(the message as the next hop received it, the published DKIM records)."""
    root = tmp_path_factory.mktemp("dkim-interop")
    port = free_port((MX,))
    dns_dir = root / "dns"
    dns_dir.mkdir()
    server_dns = auth_dns(
        dns_dir, mx=[("remote.test", "mx1.remote.test", 10)], hosts={"mx1.remote.test": [MX]}
    )
    srv = PostofficeServer(
        root / "srv",
        sections={
            "relay": {"dns_servers": [server_dns.server], "mx_port": port, "connect_timeout": 5}
        },
    )
    srv.cli("dkim", "generate", "example.test")
    records = txt_lines(srv.cli("dkim", "show", "example.test").stdout)
    assert len(records) == 2
    server_dns.args += [f"--txt-record={name},{value}" for name, value in records.items()]
    start_keeping_port(server_dns)
    sink = SmtpSink(root, MX, port).start()
    srv.add_user(ALICE, "alice-password-1")
    srv.start()
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as c:
            c.starttls(context=ctx)
            c.login(ALICE, "alice-password-1")
            c.sendmail(
                ALICE,
                ["bob@remote.test"],
                "From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
                "Subject: =?utf-8?q?interop_=C3=A9t=C3=A9?=\r\nMIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
                "\r\nCaf\u00e9  with   spaces \t\r\n\r\n.leading dot\r\n\r\n\r\n".encode()
                + LONG_LINE
                + b"\r\n",
            )
        assert wait_for(lambda: len(sink.messages()) == 1, 30), srv.log()
        received = sink.messages()[0]
    finally:
        srv.stop()
        sink.stop()
        server_dns.stop()
    # smtp-sink puts its own X- fields on top; they are not signed and may stay.
    assert received.count(b"DKIM-Signature:") == 2
    # The long line went out folded (#11 item 2), and was signed that way.
    assert max(len(line) for line in received.split(b"\n")) <= 998
    assert received.replace(b"\n ", b"").endswith(LONG_LINE + b"\n\n")
    yield received, records


@pytest.fixture(scope="module")
def port53_dns(
    tmp_path_factory: pytest.TempPathFactory, signed_message: tuple[bytes, dict[str, str]]
) -> Iterator[str]:
    """dnsmasq with the DKIM records on a random 127.53.x.y, port 53."""
    _message, records = signed_message
    address = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
    server = auth_dns(tmp_path_factory.mktemp("dns53"), txt=records)
    args = [a for a in server.args if not a.startswith(("--port=", "--listen-address="))]
    args += ["--port=53", f"--listen-address={address}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: proc.poll() is not None or answers(address, 53), 10)
        assert proc.poll() is None, "dnsmasq could not listen on port 53"
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


def dkimverify(
    message: bytes, nameserver: str, tmp: Path, require_program: Callable[[str], str], *args: str
) -> subprocess.CompletedProcess[bytes]:
    unshare = require_program("unshare")
    verifier = require_program("dkimverify")
    resolv = tmp / "resolv.conf"
    resolv.write_text(f"nameserver {nameserver}\n")
    return subprocess.run(
        [
            unshare,
            "--mount",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(resolv),
            verifier,
            *args,
        ],
        input=message,
        capture_output=True,
        timeout=60,
    )


def tamper(message: bytes) -> bytes:
    return message.replace(b"leading dot", b"leading dog")


@pytest.mark.parametrize("index", ["0", "1"], ids=["rsa", "ed25519"])
def test_dkimverify_accepts_each_signature(
    signed_message: tuple[bytes, dict[str, str]],
    port53_dns: str,
    tmp_path: Path,
    require_program: Callable[[str], str],
    index: str,
) -> None:
    message, _ = signed_message
    ok = dkimverify(message, port53_dns, tmp_path, require_program, "--index", index)
    assert ok.returncode == 0 and b"signature ok" in ok.stdout, ok.stderr
    bad = dkimverify(tamper(message), port53_dns, tmp_path, require_program, "--index", index)
    assert bad.returncode != 0


def opendkim_results(message: bytes, dns_server: tuple[str, int], tmp: Path, opendkim: str) -> str:
    """OpenDKIM's Authentication-Results for ``message`` (test mode, -t)."""
    address, port = dns_server
    unbound = tmp / "unbound.conf"
    unbound.write_text(
        "server:\n"
        "  do-not-query-localhost: no\n"
        '  module-config: "iterator"\n'
        '  local-zone: "test." nodefault\n'  # unbound answers .test itself otherwise
        "forward-zone:\n"
        '  name: "test."\n'
        f"  forward-addr: {address}@{port}\n"
    )
    conf = tmp / "opendkim.conf"
    conf.write_text(
        f"Mode v\nSyslog no\nAuthservID verifier.test\nResolverConfiguration {unbound}\n"
    )
    path = tmp / "message.eml"
    path.write_bytes(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    result = subprocess.run(
        [opendkim, "-x", str(conf), "-t", str(path), "-vv"], capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "hname='Authentication-Results'" in text, text
    return text


def test_opendkim_accepts_both_signatures(
    signed_message: tuple[bytes, dict[str, str]],
    port53_dns: str,
    tmp_path: Path,
    require_program: Callable[[str], str],
) -> None:
    opendkim = require_program("opendkim")
    message, _ = signed_message
    good = opendkim_results(message, (port53_dns, 53), tmp_path, opendkim)
    assert "header.a=rsa-sha256" in good and "header.a=ed25519-sha256" in good
    assert good.count("dkim=pass") == 2, good
    bad = opendkim_results(tamper(message), (port53_dns, 53), tmp_path, opendkim)
    assert "dkim=pass" not in bad and bad.count("dkim=fail") == 2, bad
