"""Hostile senders against SPF/DKIM/DMARC on the smtp listener (issue 11,
items 4 and 9), over real SMTP, with a real DNS server (dnsmasq on loopback).

The server judges clients on 127.0.0.1 (``[checks] exempt_networks`` holds
only 127.0.0.9, the probe client that stands for everyone else).  DNS:
sender.test lets 127.0.0.1 send (SPF) and has ``p=reject``; paypal.test,
the domain forgers want, has ``p=reject`` and sends from nowhere; evil.test
publishes RSA keys whose modulus and exponent are both 16384 bits.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.dns import auth_dns
from tests.support.helpers import wait_for
from tests.support.hostile_dkim import hostile_key, hostile_signatures
from tests.support.peers import Dnsmasq
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse

BOB = "bob@receiver.test"
RX_HOST = "mx.receiver.test"
PROBE = "127.0.0.9"  # exempt from the checks: its mail costs no DNS
HOSTILE_BITS = 16384
SIGNATURES = 5


@dataclass(frozen=True)
class HostileKey:
    record: str = field(repr=False)
    modulus: int = field(repr=False)  # too long for repr() (4300 digits at most)


@pytest.fixture(scope="module")
def hostile() -> HostileKey:
    return HostileKey(*hostile_key(HOSTILE_BITS))


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, hostile: HostileKey) -> Iterator[Dnsmasq]:
    record = hostile.record
    server = auth_dns(
        tmp_path_factory.mktemp("dns"),
        txt={
            "sender.test": "v=spf1 ip4:127.0.0.1 -all",
            "_dmarc.sender.test": "v=DMARC1; p=reject",
            "paypal.test": "v=spf1 -all",
            "_dmarc.paypal.test": "v=DMARC1; p=reject",
            "evil.test": "v=spf1 -all",
            "_dmarc.evil.test": "v=DMARC1; p=reject",
            **{f"s{i}._domainkey.evil.test": record for i in range(SIGNATURES)},
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(
        tmp_path_factory.mktemp("receiver"),
        domains=("receiver.test",),
        hostname=RX_HOST,
        sections={
            "checks": {"exempt_networks": [f"{PROBE}/32"]},
            "relay": {"dns_servers": [dns.server]},
        },
    )
    srv.add_user(BOB, "bob-password-3")
    srv.start()
    yield srv
    srv.stop()


def message(from_lines: str, extra: str = "", body: str = "Hello Bob.\n") -> bytes:
    return (
        f"{from_lines}To: {BOB}\nSubject: test\nDate: Mon, 06 Jan 2025 10:00:00 +0000\n"
        f"Message-ID: <{abs(hash((from_lines, extra, body)))}@sender.test>\n{extra}\n{body}"
    ).encode()


def send(srv: PostofficeServer, msg: bytes, sender: str = "alice@sender.test") -> tuple[int, str]:
    """The reply to the end of DATA, from 127.0.0.1 (judged by the checks)."""
    port = srv.ports["smtp"]
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.1", 0), timeout=60) as c:
        c.ehlo("client.sender.test")
        try:
            c.sendmail(sender, [BOB], msg.replace(b"\n", b"\r\n"))
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


def newest(srv: PostofficeServer, before: int) -> bytes:
    assert wait_for(lambda: len(srv.messages(BOB)) > before, 10)
    return max(srv.messages(BOB), key=lambda p: p.stat().st_mtime_ns).read_bytes()


def header_fields(content: bytes) -> list[str]:
    head = content.split(b"\n\n", 1)[0].decode()
    return [re.sub(r"\n[ \t]+", " ", f) for f in re.split(r"\n(?![ \t])", head)]


# --- item 4: hostile DKIM keys ------------------------------------------------------------------
def start_data(client: RawSmtp, sender: str) -> None:
    assert client.reply()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    assert client.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert client.cmd("DATA")[0] == 354


def test_hostile_dkim_keys_get_a_verdict_at_once_and_stall_nobody(
    receiver: PostofficeServer, hostile: HostileKey
) -> None:
    modulus = hostile.modulus
    body = message("From: CEO <ceo@evil.test>\n", body="Wire the money today.\n")
    selectors = [f"s{i}" for i in range(SIGNATURES)]
    signed = hostile_signatures(body, "evil.test", selectors, modulus) + body
    port = receiver.ports["smtp"]
    probe = RawSmtp("127.0.0.1", port, timeout=120, source=PROBE)
    attacker = RawSmtp("127.0.0.1", port, timeout=120, source="127.0.0.1")
    for client in (probe, attacker):  # no Nagle delay between a message and its "."
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    before = len(receiver.messages(BOB))
    start_data(probe, "probe@elsewhere.test")
    probe.send(b"Subject: warm-up\r\n\r\nfirst\r\n")
    assert probe.cmd(".")[0] == 250  # the mailbox exists: the timed delivery is a plain one
    assert probe.cmd("MAIL FROM:<probe@elsewhere.test>")[0] == 250
    assert probe.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert probe.cmd("DATA")[0] == 354
    probe.send(b"Subject: meanwhile\r\n\r\nsecond\r\n")
    start_data(attacker, "ceo@evil.test")
    attacker.send(signed.replace(b"\n", b"\r\n"))

    attacked = time.monotonic()
    attacker.send(b".\r\n")
    time.sleep(0.02)  # the attacker's end of data is in first
    sent = time.monotonic()
    code, _ = probe.cmd(".")
    probe_seconds = time.monotonic() - sent
    verdict, lines = attacker.reply()
    verdict_seconds = time.monotonic() - attacked

    assert (verdict, lines[-1][:5]) == (550, "5.7.1"), lines
    assert verdict_seconds < 1.0, f"verdict after {verdict_seconds:.2f}s"
    assert code == 250 and probe_seconds < 0.1, f"parallel delivery after {probe_seconds:.2f}s"
    assert len(receiver.messages(BOB)) == before + 2

    # Every signature got its verdict: refused unread, a permanent error (RFC 8301).
    def verdicts() -> list[str]:  # the mail log's "checks" record (maillog.py)
        return [x for x in receiver.log().splitlines() if "checks id=" in x and ATTACK_HELO in x]

    assert wait_for(lambda: len(verdicts()) == 1, 5)
    [line] = verdicts()
    assert ",".join(["permerror:evil.test"] * SIGNATURES) in line, line


ATTACK_HELO = "client=127.0.0.1 helo=client.test"


# --- item 9: DMARC p=reject bypasses -------------------------------------------------------------
BYPASSES = {
    "trailing-dot": "From: PayPal <service@paypal.test.>\n",
    "no-from": "",
    "fourth-address": "From: a@sender.test, b@other.test, c@third.test, service@paypal.test\n",
    "two-from-fields": "From: alice@sender.test\nFrom: carol@other.test\n",
    "six-domains": "From: " + ", ".join(f"x@d{i}.test" for i in range(6)) + "\n",
    "no-domain": "From: service\n",
    "empty-group": "From: undisclosed-recipients:;\n",
}


@pytest.mark.parametrize("from_lines", BYPASSES.values(), ids=BYPASSES.keys())
def test_dmarc_bypass_is_refused(receiver: PostofficeServer, from_lines: str) -> None:
    before = len(receiver.messages(BOB))
    code, text = send(receiver, message(from_lines))
    assert (code, text[:5]) == (550, "5.7.1"), text
    assert len(receiver.messages(BOB)) == before


def test_every_author_domain_is_evaluated_and_the_normalised_one_named(
    receiver: PostofficeServer,
) -> None:
    before = len(receiver.messages(BOB))
    code, _ = send(receiver, message("From: <alice@sender.test.>, carol@other.test\n"))
    assert code == 250
    [ours] = [
        f
        for f in header_fields(newest(receiver, before))
        if f.startswith(f"Authentication-Results: {RX_HOST};")
    ]
    assert "dmarc=pass (p=reject dis=none) header.from=sender.test;" in ours
    assert "dmarc=none (no policy) header.from=other.test" in ours


# --- item 9: forged Authentication-Results -------------------------------------------------------
FORGERIES = {
    "quoted": f'Authentication-Results: "{RX_HOST}"; dkim=pass header.d=paypal.test\n',
    "quoted-escaped": 'Authentication-Results: "mx.receiver\\.test"; dkim=pass header.d=paypal.test\n',
    "trailing-dot": f"Authentication-Results: {RX_HOST}.; dkim=pass header.d=paypal.test\n",
    "folded-quoted": f'Authentication-Results:\n "{RX_HOST.upper()}." ;\n\tdkim=pass header.d=paypal.test\n',
    "deep-comment": "Authentication-Results: "
    + "(" * 12
    + ")" * 12
    + f" {RX_HOST}; dkim=pass header.d=paypal.test\n",
}


@pytest.mark.parametrize("forged", FORGERIES.values(), ids=FORGERIES.keys())
def test_forged_authentication_results_are_removed(receiver: PostofficeServer, forged: str) -> None:
    before = len(receiver.messages(BOB))
    other = "Authentication-Results: elsewhere.test; spf=pass smtp.mailfrom=x@elsewhere.test\n"
    code, _ = send(receiver, message("From: alice@sender.test\n", extra=forged + other))
    assert code == 250
    content = newest(receiver, before)
    fields = header_fields(content)
    assert b"header.d=paypal.test" not in content, content.decode()
    ours = [f for f in fields if f.startswith(f"Authentication-Results: {RX_HOST};")]
    assert len(ours) == 1 and "dmarc=pass" in ours[0]
    assert other.strip() in fields  # another server's results stay (RFC 8601 §5)


def test_a_forged_field_name_in_odd_case_is_removed(receiver: PostofficeServer) -> None:
    # Alone: no other field name in the header section that a quick
    # case-sensitive look for "uthentication-" would find.
    before = len(receiver.messages(BOB))
    forged = f"AuThEnTiCaTiOn-ReSuLtS: {RX_HOST}; dkim=pass header.d=paypal.test\n"
    code, _ = send(receiver, message("From: alice@sender.test\n", extra=forged))
    assert code == 250
    content = newest(receiver, before)
    assert b"header.d=paypal.test" not in content, content.decode()
