"""DKIM keys in the [cluster] database: made with node 1's CLI, used by node 2
for mail submitted there from the next message on, and after a rotation the
new ones; the receiver (a plain postoffice) and dkimpy find the signatures
good against the records the CLI printed (cluster/dkim_keys.py)."""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.support.cluster import ALICE, ALICE_PW, PROPAGATION, first_success
from tests.support.dns import auth_dns, start_keeping_port
from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq
from tests.support.server import PostofficeServer

BOB = "bob@receiver.test"
RX_HOST = "mx.receiver.test"


def zone_records(cli_output: str) -> dict[str, str]:
    """TXT records from the zone-file lines `dkim generate` printed."""
    found = {}
    for line in cli_output.splitlines():
        if " IN TXT " in line:
            name = line.split(". IN TXT", 1)[0]
            found[name] = "".join(re.findall(r'"([^"]*)"', line))
    return found


@pytest.fixture
def setup(
    tmp_path: Path, pg_url: str
) -> Iterator[tuple[PostofficeServer, PostofficeServer, PostofficeServer, Dnsmasq]]:
    (tmp_path / "dns").mkdir()
    dns = auth_dns(
        tmp_path / "dns",
        txt={"example.test": "v=spf1 ip4:127.0.0.0/8 -all"},
        mx=[("receiver.test", RX_HOST, 10)],
        hosts={RX_HOST: ["127.0.0.1"]},
    )
    receiver = PostofficeServer(
        tmp_path / "rx",
        domains=("receiver.test",),
        hostname=RX_HOST,
        sections={
            "checks": {"exempt_networks": ["::1/128"]},
            "relay": {"dns_servers": [dns.server]},
        },
    )
    receiver.add_user(BOB, "bob-password-3")
    sections = {
        "cluster": {"database": pg_url},
        "relay": {
            "dns_servers": [dns.server],
            "mx_port": receiver.ports["smtp"],
            "retry_schedule": [1],
            "connect_timeout": 5,
        },
    }
    node1 = PostofficeServer(tmp_path / "node1", sections=sections)
    node2 = PostofficeServer(tmp_path / "node2", sections=sections)
    try:
        node1.start()
        node2.start()  # before the keys exist: they must reach it without a restart
        yield node1, node2, receiver, dns
    finally:
        for server in (node1, node2, receiver):
            server.stop()
        dns.stop()


def submit(node: PostofficeServer, subject: str) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=30) as c:
        c.starttls(context=ctx)
        c.login(ALICE, ALICE_PW)
        c.sendmail(
            ALICE,
            [BOB],
            f"From: Alice <{ALICE}>\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nHi Bob.\r\n".encode(),
        )


def received(receiver: PostofficeServer, subject: str, log: str) -> bytes:
    def find() -> bytes | None:
        for path in receiver.messages(BOB):
            content = path.read_bytes()
            if f"Subject: {subject}\n".encode() in content:
                return content
        return None

    assert wait_for(lambda: find() is not None, 30), log
    content = find()
    assert content is not None
    return content


def selectors(content: bytes) -> set[str]:
    return set(re.findall(r"\bs=([0-9a-z]+);", content.decode().replace("\n ", " ")))


def verify_all(content: bytes, records: dict[str, str]) -> int:
    """How many DKIM-Signature fields dkimpy finds good against ``records``."""

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes:
        key = name.decode() if isinstance(name, bytes) else name
        return records.get(key.rstrip("."), "").encode()

    good = 0
    for index in range(content.count(b"DKIM-Signature:")):
        verifier = dkim.DKIM(content)
        good += bool(verifier.verify(idx=index, dnsfunc=dnsfunc))
    return good


def test_keys_made_on_node_1_sign_mail_submitted_on_node_2(
    setup: tuple[PostofficeServer, PostofficeServer, PostofficeServer, Dnsmasq],
) -> None:
    node1, node2, receiver, dns = setup
    node1.add_user(ALICE, ALICE_PW)
    out = node1.cli("dkim", "generate", "example.test").stdout
    assert "in the [cluster] database" in out
    records = zone_records(out)
    assert len(records) == 2
    # Nothing in either node's data dir: the keys are in the database.
    assert not (node1.data_dir / "dkim").exists() and not (node2.data_dir / "dkim").exists()
    assert node2.cli("dkim", "show", "example.test").stdout.count(" IN TXT ") == 2
    for name, value in records.items():
        dns.args.append(f"--txt-record={name},{value}")
    start_keeping_port(dns)
    receiver.start()
    # The account reaches node 2 within a second (the keys came with the same speed).
    assert first_success(lambda: _can_login(node2), PROPAGATION) is not None

    submit(node2, "first")
    content = received(receiver, "first", node2.log())
    assert content.count(b"DKIM-Signature:") == 2  # RSA and Ed25519
    assert selectors(content) == {n.split(".", 1)[0] for n in records}
    assert verify_all(content, records) == 2
    assert "dkim=pass header.d=example.test" in content.decode().replace("\n ", " ")

    # A rotation on node 1: node 2 signs with the new keys from the next message on.
    rotated = zone_records(node1.cli("dkim", "generate", "--rotate", "example.test").stdout)
    assert len(rotated) == 2 and not set(rotated) & set(records)
    time.sleep(PROPAGATION)  # issue 17: in force on every node within 1 s
    submit(node2, "second")
    content = received(receiver, "second", node2.log())
    assert selectors(content) == {n.split(".", 1)[0] for n in rotated}
    assert verify_all(content, rotated) == 2
    assert verify_all(content, records) == 0  # not the old keys


def test_generate_twice_is_refused_across_nodes(
    setup: tuple[PostofficeServer, PostofficeServer, PostofficeServer, Dnsmasq],
) -> None:
    node1, node2, _receiver, _dns = setup
    node1.cli("dkim", "generate", "example.test")
    again = node2.cli("dkim", "generate", "example.test", check=False)
    assert again.returncode == 1
    assert "example.test has DKIM keys already" in again.stderr


def _can_login(node: PostofficeServer) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", node.ports["submission"], timeout=10) as c:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            c.starttls(context=ctx)
            c.login(ALICE, ALICE_PW)
        return True
    except smtplib.SMTPAuthenticationError:
        return False
