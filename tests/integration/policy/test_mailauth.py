"""Inbound SPF/DKIM/DMARC verdicts (policy/mailauth.py) against a real DNS
server, with messages signed by our own signer (policy/dkim_sign.py)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postoffice.config.settings import CheckSettings, Settings
from postoffice.mail.address import Address
from postoffice.policy.cpu_workers import CpuWorkers
from postoffice.policy.dkim_keys import KeyStore, generate, txt_record
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.dkim_verify import TARGET
from postoffice.policy.mailauth import CheckOutcome, InboundChecks
from tests.support.dns import auth_dns, resolver_for
from tests.support.peers import Dnsmasq

GOOD_IP = "192.0.2.10"  # listed in sender.test's SPF record
BAD_IP = "203.0.113.9"
HOSTNAME = "mx.receiver.test"
ALICE = Address("alice", "sender.test")


@dataclass
class World:
    dns: Dnsmasq
    data_dir: Path
    dkim_workers: CpuWorkers

    def checks(self, **settings: object) -> InboundChecks:
        config = Settings(
            hostname=HOSTNAME,
            checks=CheckSettings(
                exempt_networks=(ipaddress.ip_network("127.0.0.0/8"),),
                **settings,  # type: ignore[arg-type]
            ),
        )
        return InboundChecks(
            config, resolver_for(self.dns), timeout=20, dkim_workers=self.dkim_workers
        )

    def sign(self, message: bytes) -> bytes:
        return DkimSigner(KeyStore(self.data_dir)).sign_blocking(message) + message


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data_dir = tmp_path_factory.mktemp("data")
    keys = generate(data_dir, "sender.test") + generate(data_dir, "strict.test")
    spf_ok = f"v=spf1 ip4:{GOOD_IP} -all"
    server = auth_dns(
        tmp_path_factory.mktemp("dns"),
        txt={
            "sender.test": spf_ok,
            "_dmarc.sender.test": "v=DMARC1; p=reject; rua=mailto:d@sender.test",
            "strict.test": spf_ok,
            "_dmarc.strict.test": "v=DMARC1; p=reject; adkim=s; aspf=s",
            "quarantine.test": spf_ok,
            "_dmarc.quarantine.test": "v=DMARC1; p=quarantine",
            "sampled.test": spf_ok,
            "_dmarc.sampled.test": "v=DMARC1; p=reject; pct=0",
            "nodmarc.test": spf_ok,
            "helo.client.test": f"v=spf1 ip4:{GOOD_IP} -all",
            **{k.dns_name: txt_record(k) for k in keys},
        },
    ).start()
    workers = CpuWorkers(TARGET, workers=2, timeout=20)
    yield World(server, data_dir, workers)
    workers.close()
    server.stop()


def message(from_addr: str = "alice@sender.test", body: str = "Hello.\n") -> bytes:
    return (
        f"From: Alice <{from_addr}>\n"
        "To: bob@receiver.test\n"
        "Subject: greetings\n"
        "Date: Mon, 06 Jan 2025 10:00:00 +0000\n"
        "Message-ID: <1@sender.test>\n"
        "\n"
        f"{body}"
    ).encode()


def judge(
    checks: InboundChecks,
    msg: bytes,
    *,
    ip: str = GOOD_IP,
    sender: Address | None = ALICE,
    helo: str = "helo.client.test",
) -> CheckOutcome:
    return asyncio.run(checks.judge(client_ip=ip, helo=helo, sender=sender, message=msg))


def header(outcome: CheckOutcome) -> str:
    text = outcome.header.decode()
    assert text.startswith(f"Authentication-Results: {HOSTNAME};\n\t")
    assert text.endswith("\n") and "\r" not in text
    return text


def test_signed_message_from_an_authorized_address_passes_everything(world: World) -> None:
    outcome = judge(world.checks(), world.sign(message()))
    text = header(outcome)
    assert outcome.reply is None
    assert "spf=pass" in text and "smtp.mailfrom=alice@sender.test" in text
    assert "spf=pass (helo.client.test: ip4:192.0.2.10) smtp.helo=helo.client.test" in text
    assert text.count("dkim=pass") == 2
    assert "header.a=rsa-sha256" in text and "header.a=ed25519-sha256" in text
    assert "dmarc=pass (p=reject dis=none) header.from=sender.test" in text


def test_unsigned_message_passes_dmarc_through_spf(world: World) -> None:
    outcome = judge(world.checks(), message())
    text = header(outcome)
    assert outcome.reply is None
    assert "dkim=none" in text
    assert "dmarc=pass" in text


def test_signed_message_from_a_wrong_address_passes_dmarc_through_dkim(world: World) -> None:
    outcome = judge(world.checks(), world.sign(message()), ip=BAD_IP)
    text = header(outcome)
    assert outcome.reply is None
    assert "spf=fail" in text
    assert text.count("dkim=pass") == 2
    assert "dmarc=pass" in text


def test_tampered_body_fails_dkim_and_dmarc_reject_refuses(world: World) -> None:
    signed = world.sign(message(body="Pay 10 EUR.\n"))
    tampered = signed.replace(b"Pay 10 EUR.", b"Pay 99 EUR.")
    outcome = judge(world.checks(), tampered, ip=BAD_IP)
    text = header(outcome)
    assert text.count("dkim=fail (body hash did not verify)") == 2
    assert "dmarc=fail (p=reject dis=reject) header.from=sender.test" in text
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.enhanced) == (550, "5.7.1")
    assert "DMARC" in outcome.reply.lines[0]


def test_tampered_header_and_added_from_fail(world: World) -> None:
    signed = world.sign(message())
    subject = signed.replace(b"Subject: greetings", b"Subject: urgent")
    assert header(judge(world.checks(), subject)).count("dkim=fail") == 2
    # From: is oversigned: a second From: added on top breaks the signature.
    added = signed.replace(b"From: Alice", b"From: Mallory <m@evil.test>\nFrom: Alice", 1)
    assert header(judge(world.checks(), added)).count("dkim=fail") == 2


def test_dmarc_reject_can_be_turned_into_a_record_only(world: World) -> None:
    outcome = judge(world.checks(dmarc_reject=False), message(), ip=BAD_IP)
    assert outcome.reply is None
    assert "dmarc=fail (p=reject dis=reject)" in header(outcome)


def test_quarantine_and_pct_zero_are_only_recorded(world: World) -> None:
    q = judge(
        world.checks(),
        message("a@quarantine.test"),
        ip=BAD_IP,
        sender=Address("a", "quarantine.test"),
    )
    assert q.reply is None
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.test" in header(q)
    # pct=0: no message is sampled, so reject becomes quarantine (RFC 7489 §6.6.4).
    s = judge(
        world.checks(), message("a@sampled.test"), ip=BAD_IP, sender=Address("a", "sampled.test")
    )
    assert s.reply is None
    assert "dmarc=fail (p=reject dis=quarantine)" in header(s)


def test_no_dmarc_record_means_no_policy(world: World) -> None:
    outcome = judge(
        world.checks(), message("a@nodmarc.test"), ip=BAD_IP, sender=Address("a", "nodmarc.test")
    )
    text = header(outcome)
    assert outcome.reply is None
    assert "spf=fail" in text and "dmarc=none" in text


def test_relaxed_and_strict_alignment(world: World) -> None:
    # news.sender.test has no record: the organizational domain's policy applies,
    # and d=sender.test is aligned in relaxed mode (RFC 7489 §3.1.1).
    signed = world.sign(message("alice@news.sender.test"))
    assert b"d=sender.test" in signed  # the signer fell back to the parent domain
    relaxed = judge(world.checks(), signed, ip=BAD_IP, sender=Address("x", "other.test"))
    assert "dmarc=pass" in header(relaxed)
    strict_signed = world.sign(message("alice@news.strict.test"))
    strict = judge(world.checks(), strict_signed, ip=BAD_IP, sender=Address("x", "other.test"))
    assert "dmarc=fail" in header(strict)
    assert strict.reply is not None and strict.reply.code == 550


def test_temporary_dns_failure_is_451_never_a_pass(world: World) -> None:
    # dnsmasq refuses names outside .test: the DMARC and SPF lookups fail for now.
    outcome = judge(
        world.checks(), message("a@sender.example"), sender=Address("a", "sender.example")
    )
    text = header(outcome)
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.7.0")
    assert "spf=temperror" in text and "dmarc=temperror" in text


def test_unknown_selector_is_permerror(world: World) -> None:
    signed = world.sign(message())
    broken = signed.replace(b"s=", b"s=x", 2)
    text = header(judge(world.checks(), broken))
    assert text.count("dkim=permerror (no key for signature)") == 2
    assert "header.s=x" in text


def test_null_sender_uses_the_helo_identity(world: World) -> None:
    outcome = judge(world.checks(), message("mailer-daemon@sender.test"), sender=None)
    text = header(outcome)
    assert "smtp.mailfrom" not in text
    assert "spf=pass" in text and "smtp.helo=helo.client.test" in text
    # HELO's domain is not aligned with sender.test and nothing is signed: DMARC fails.
    assert "dmarc=fail" in text and outcome.reply is not None


def test_exempt_networks_are_not_judged(world: World) -> None:
    checks = world.checks()
    assert not checks.applies("127.0.0.1")
    assert not checks.applies("::ffff:127.0.0.1")
    assert checks.applies("::1")  # narrowed: only 127.0.0.0/8 here
    assert checks.applies(GOOD_IP)
    assert InboundChecks(Settings(), resolver_for(world.dns)).applies("::1") is False


def test_mail_whose_author_dmarc_cannot_check_is_refused_or_recorded(world: World) -> None:
    no_from = message().replace(b"From: Alice <alice@sender.test>\n", b"")
    refused = judge(world.checks(), no_from)
    assert refused.reply is not None
    assert (refused.reply.code, refused.reply.enhanced) == (550, "5.7.1")
    assert "dmarc=permerror (no From: field)" in header(refused)
    recorded = judge(world.checks(dmarc_reject=False), no_from)
    assert recorded.reply is None
    assert "dmarc=permerror (no From: field)" in header(recorded)


def test_several_author_domains_are_all_evaluated_strictest_wins(world: World) -> None:
    both = message().replace(b"<alice@sender.test>", b"<alice@sender.test>, b@quarantine.test")
    outcome = judge(world.checks(), both, ip=BAD_IP)  # neither passes: reject beats quarantine
    text = header(outcome)
    assert "header.from=sender.test" in text and "header.from=quarantine.test" in text
    assert outcome.reply is not None and outcome.reply.code == 550


def test_dkim_verification_past_its_deadline_is_a_temporary_failure(world: World) -> None:
    # Five megabytes hashed twice take far longer than 50 ms of the worker.
    big = world.sign(message(body="x" * 76 + "\n") + b"y" * 76 * 70_000 + b"\n")
    slow = CpuWorkers(TARGET, workers=1, timeout=0.05)
    try:
        config = Settings(hostname=HOSTNAME)
        checks = InboundChecks(config, resolver_for(world.dns), timeout=20, dkim_workers=slow)
        outcome = judge(checks, big, ip=BAD_IP)
    finally:
        slow.close()
    text = header(outcome)
    assert text.count("dkim=temperror (verification took over 0.05s)") == 2
    assert outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.7.0")
