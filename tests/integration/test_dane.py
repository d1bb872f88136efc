"""DANE for outbound SMTP end to end (RFC 7672): a signed zone, a validating
resolver, a TLS peer, and the remote courier between them.

The zone ``dane.test`` is signed with ldns-signzone and validated by unbound
(tests/support/dnssec_lab.py); the same records are also served unsigned
(insecure: no AD bit) and with a wrong trust anchor (bogus: SERVFAIL).
Each destination domain under it has its own MX host, all on 127.0.0.2,
where a scripted MTA offers STARTTLS (or not) with a CA-issued certificate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.config.settings import ListenAddress, RelaySettings
from postoffice.delivery.courier import Outcome, RecipientResult
from postoffice.delivery.remote import RemoteCourier
from postoffice.dns.resolver import DnsResolver
from postoffice.mail.address import Address
from postoffice.net.tls import server_context
from tests.integration.delivery.test_remote_courier import FAST, deliver
from tests.integration.test_outbound import ALICE, queue_files, submit
from tests.support.certs import Pki, make_pki
from tests.support.dnssec_lab import DnssecLab, spki_sha256
from tests.support.helpers import wait_for
from tests.support.peers import ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

MX_IP = "127.0.0.2"
WRONG = "00" * 32
# destination -> what its MX host's TLSA record says (None: no TLSA record)
DOMAINS = {"good": "3 1 1 {key}", "bad": f"3 1 1 {WRONG}", "unusable": "0 0 1 {key}", "none": None}


def zone_records(port: int, key: str) -> list[str]:
    lines = []
    for name, tlsa in DOMAINS.items():
        lines += [f"{name} IN MX 10 mx.{name}", f"mx.{name} IN A {MX_IP}"]
        if tlsa is not None:
            lines.append(f"_{port}._tcp.mx.{name} IN TLSA {tlsa.format(key=key)}")
    return lines


@pytest.fixture(scope="module")
def mx_port() -> int:
    return free_port((MX_IP,))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    names = [f"mx.{name}.dane.test" for name in DOMAINS]
    return make_pki(tmp_path_factory.mktemp("pki"), names)


@pytest.fixture(scope="module")
def started_labs() -> Iterator[dict[str, DnssecLab]]:
    """The labs of this module, started by ``labs`` once the programs are known there."""
    started: dict[str, DnssecLab] = {}
    yield started
    for lab in started.values():
        lab.stop()


@pytest.fixture
def labs(
    tmp_path_factory: pytest.TempPathFactory,
    require_program: Callable[[str], str],
    started_labs: dict[str, DnssecLab],
    mx_port: int,
    pki: Pki,
) -> dict[str, DnssecLab]:
    for program in ("unbound", "ldns-keygen", "ldns-signzone"):
        require_program(program)
    if not started_labs:
        records = zone_records(mx_port, spki_sha256(pki.cert.read_bytes()))
        for mode in ("signed", "unsigned", "bogus"):
            root = tmp_path_factory.mktemp(f"dns-{mode}")
            started_labs[mode] = DnssecLab(root, "dane.test", records, mode=mode).start()
    return started_labs


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture
def peer(mx_port: int, pki: Pki) -> Iterator[ScriptedMta]:
    mta = ScriptedMta(MX_IP, mx_port, tls=server_context(pki.cert, pki.key)).start()
    yield mta
    mta.stop()


def courier(lab: DnssecLab, port: int) -> RemoteCourier:
    settings = RelaySettings(mx_port=port, dns_servers=(ListenAddress("127.0.0.1", lab.port),))
    return RemoteCourier(
        settings,
        "mail.example.test",
        DnsResolver(settings.dns_servers, 5.0),
        timeouts=FAST,
        rng=random.Random(7),
    )


def send(
    tmp_path: Path, executor: ThreadPoolExecutor, lab: DnssecLab, port: int, name: str
) -> RecipientResult:
    domain = f"{name}.dane.test"
    (result,) = deliver(tmp_path, executor, courier(lab, port), domain, [Address("bob", domain)])
    return result


def test_matching_tlsa_delivers_over_verified_tls(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], peer: ScriptedMta
) -> None:
    r = send(tmp_path, executor, labs["signed"], peer.port, "good")
    assert r.outcome is Outcome.DELIVERED, r.text
    assert "verified by DANE (TLSA 3 1 1 matched" in r.text  # what the mail log records
    assert [m.tls for m in peer.received] == [True]


def test_mismatched_tlsa_is_deferred_never_sent(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], peer: ScriptedMta
) -> None:
    r = send(tmp_path, executor, labs["signed"], peer.port, "bad")
    assert r.outcome is Outcome.DEFERRED
    assert r.status == "4.7.5" and "DANE verification failed" in r.text
    assert peer.received == []
    # The handshake happened, then we hung up: no plaintext second try, no MAIL.
    assert peer.commands.count("STARTTLS") == 1
    assert not any(c.startswith("MAIL") for c in peer.commands)


def test_dane_host_without_starttls_is_deferred(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], mx_port: int
) -> None:
    plain = ScriptedMta(MX_IP, mx_port).start()  # no STARTTLS offered
    try:
        r = send(tmp_path, executor, labs["signed"], mx_port, "good")
        assert r.outcome is Outcome.DEFERRED
        assert r.status == "4.7.5" and "no STARTTLS" in r.text
        assert plain.received == []
    finally:
        plain.stop()


def test_unusable_tlsa_means_tls_without_authentication(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], peer: ScriptedMta
) -> None:
    # RFC 7672 §2.2: a secure TLSA RRset of unusable records (PKIX-TA here)
    # still makes TLS mandatory, but nothing can be authenticated.
    r = send(tmp_path, executor, labs["signed"], peer.port, "unusable")
    assert r.outcome is Outcome.DELIVERED, r.text
    assert "(TLS TLSv1." in r.text and "verified" not in r.text
    assert [m.tls for m in peer.received] == [True]


def test_unusable_tlsa_and_no_starttls_is_deferred(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], mx_port: int
) -> None:
    plain = ScriptedMta(MX_IP, mx_port).start()
    try:
        r = send(tmp_path, executor, labs["signed"], mx_port, "unusable")
        assert r.outcome is Outcome.DEFERRED and r.status == "4.7.5"
        assert plain.received == []
    finally:
        plain.stop()


def test_secure_domain_without_tlsa_stays_opportunistic(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], mx_port: int
) -> None:
    plain = ScriptedMta(MX_IP, mx_port).start()
    try:
        r = send(tmp_path, executor, labs["signed"], mx_port, "none")
        assert r.outcome is Outcome.DELIVERED, r.text
        assert [m.tls for m in plain.received] == [False]
    finally:
        plain.stop()


def test_insecure_zone_falls_back_to_opportunistic_tls(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], peer: ScriptedMta
) -> None:
    # The same records unsigned: the TLSA record (wrong, here) is not
    # authenticated, so it is ignored (RFC 7672 §2.2.2).
    r = send(tmp_path, executor, labs["unsigned"], peer.port, "bad")
    assert r.outcome is Outcome.DELIVERED, r.text
    assert "(TLS TLSv1." in r.text and "verified" not in r.text
    assert [m.tls for m in peer.received] == [True]


def test_bogus_zone_is_deferred(
    tmp_path: Path, executor: ThreadPoolExecutor, labs: dict[str, DnssecLab], peer: ScriptedMta
) -> None:
    # Signatures that do not validate: the resolver answers SERVFAIL, which
    # must not be taken for "insecure" (that would be a downgrade).
    r = send(tmp_path, executor, labs["bogus"], peer.port, "good")
    assert r.outcome is Outcome.DEFERRED
    assert r.status.startswith("4.")
    assert peer.received == [] and peer.commands == []


@pytest.mark.parametrize("matching", [True, False])
def test_the_server_relays_to_a_dane_postoffice_only_when_its_key_matches(
    tmp_path: Path, require_program: Callable[[str], str], matching: bool
) -> None:
    # The whole path: submission, queue, courier, validating resolver, and a
    # second postoffice as the MX whose key the signed zone pins (3 1 1).
    for program in ("unbound", "ldns-keygen", "ldns-signzone"):
        require_program(program)
    other = PostofficeServer(
        tmp_path / "mx", domains=("good.dane.test",), hostname="mx.good.dane.test", host=MX_IP
    )
    other.add_user("bob@good.dane.test", "bob-password-3")
    port = other.ports["smtp"]
    key = spki_sha256((other.data_dir / "tls" / "cert.pem").read_bytes())
    records = ["good IN MX 10 mx.good", f"mx.good IN A {MX_IP}"]
    records.append(f"_{port}._tcp.mx.good IN TLSA 3 1 1 {key if matching else WRONG}")
    lab = DnssecLab(tmp_path / "dns", "dane.test", records).start()
    other.start()
    try:
        relay = {
            "mx_port": port,
            "dns_servers": [lab.server],
            "retry_schedule": [60],
            "connect_timeout": 5,
        }
        srv = PostofficeServer(tmp_path / "a", sections={"relay": relay})
        srv.add_user(ALICE, "alice-password-1")
        srv.start()
        try:
            submit(srv, ["bob@good.dane.test"], subject="dane")
            if matching:
                assert wait_for(lambda: len(other.messages("bob@good.dane.test")) == 1)
                assert wait_for(lambda: "verified by DANE (TLSA 3 1 1 matched" in srv.log())
                content = other.messages("bob@good.dane.test")[0].read_bytes()
                assert b"with ESMTPS" in content
            else:
                assert wait_for(lambda: "DANE verification failed" in srv.log())
                assert wait_for(lambda: "4.7.5" in srv.log())
                assert other.messages("bob@good.dane.test") == []
                assert len(queue_files(srv)) >= 1  # deferred, waiting for a retry
        finally:
            srv.stop()
    finally:
        other.stop()
        lab.stop()
