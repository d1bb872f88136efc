"""``postoffice doctor`` against a running server and real DNS zones (dnsmasq):
a correct zone, the zone without each record, and wrong records."""

from __future__ import annotations

import dataclasses
import datetime
import io
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postoffice.config.settings import (
    ListenAddress,
    ListenSettings,
    Settings,
    TlsSettings,
    load_settings,
)
from postoffice.dns.resolver import DnsResolver
from postoffice.doctor import LOOKUP_LIFETIME, check_certificate, run_doctor
from postoffice.policy.dkim_keys import generate, load_keys, txt_record
from tests.support.dns import auth_dns
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

HOST = "mail.example.test"
DOMAIN = "example.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(tmp_path_factory.mktemp("doctor"), hostname=HOST, domains=(DOMAIN,))
    srv.cli("dkim", "generate", DOMAIN)
    srv.start()
    yield srv
    srv.stop()


def good_zone(srv: PostofficeServer) -> dict[str, Any]:
    return {
        "txt": {
            DOMAIN: "v=spf1 mx -all",
            HOST: "v=spf1 a -all",
            f"_dmarc.{DOMAIN}": f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}",
            **{k.dns_name: txt_record(k) for k in load_keys(srv.data_dir, DOMAIN)},
        },
        "mx": [(DOMAIN, HOST, 10)],
        "hosts": {HOST: ["127.0.0.1"]},  # dnsmasq makes the matching PTR too
    }


def doctor(
    srv: PostofficeServer, tmp_path: Path, zone: dict[str, Any], *extra_args: str
) -> tuple[int, str]:
    dns = auth_dns(tmp_path, **zone)
    dns.args += list(extra_args)
    dns.start()
    try:
        settings = with_dns(load_settings(srv.config), dns)
        out = io.StringIO()
        code = run_doctor(settings, lookups(settings), [DOMAIN], out)
    finally:
        dns.stop()
    return code, out.getvalue()


def lookups(settings: Settings) -> DnsResolver:
    """The resolver ``postoffice doctor`` makes for ``settings``."""
    return DnsResolver(settings.relay.dns_servers, lifetime=LOOKUP_LIFETIME)


def with_dns(settings: Settings, dns: Dnsmasq) -> Settings:
    relay = dataclasses.replace(settings.relay, dns_servers=(ListenAddress("127.0.0.1", dns.port),))
    return dataclasses.replace(settings, relay=relay)


def statuses(text: str) -> dict[str, str]:
    """record line -> status, for the lines that carry a status."""
    found = {}
    for line in text.splitlines():
        status, _, record = line.partition(" ")
        if status in ("ok", "missing", "wrong", "warn"):
            found[record.strip()] = status
    return found


def test_correct_zone_passes_through_the_cli(server: PostofficeServer, tmp_path: Path) -> None:
    dns = auth_dns(tmp_path, **good_zone(server)).start()
    try:
        config = tmp_path / "doctor.toml"
        config.write_text(
            server.config.read_text() + f'\n[relay]\ndns_servers = ["{dns.server}"]\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "postoffice", "doctor", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        dns.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    seen = statuses(result.stdout)
    assert seen[f"{DOMAIN}. IN MX 10 {HOST}."] == "ok"
    assert seen[f"{HOST}. IN A 127.0.0.1"] == "ok"
    assert seen[f"1.0.0.127.in-addr.arpa. IN PTR {HOST}."] == "ok"
    assert seen[f'{DOMAIN}. IN TXT "v=spf1 mx -all"'] == "ok"
    assert seen[f'{HOST}. IN TXT "v=spf1 a -all"'] == "ok"
    dkim = [r for r in seen if "._domainkey." in r]
    assert len(dkim) == 2 and all(seen[r] == "ok" for r in dkim)
    assert any(r.startswith(f"_dmarc.{DOMAIN}. IN TXT") and s == "ok" for r, s in seen.items())
    # Every listener answers; smtp on loopback is only a warning, like the self-signed cert.
    assert (
        sum(1 for r, s in seen.items() if "listener" in r and s == "ok") == 6
    )  # smtp is the warning
    assert seen[f"smtp listener 127.0.0.1:{server.ports['smtp']}"] == "warn"
    assert "All required records are in place." in result.stdout


def drop(zone: dict[str, Any], kind: str, name: str | None = None) -> dict[str, Any]:
    zone = {k: dict(v) if isinstance(v, dict) else list(v) for k, v in zone.items()}
    if kind == "txt":
        assert name is not None
        for key in [k for k in zone["txt"] if k == name or k.endswith(name)]:
            del zone["txt"][key]
    else:
        zone[kind] = {} if kind == "hosts" else []
    return zone


@pytest.mark.parametrize(
    ("kind", "name", "line"),
    [
        ("mx", None, f"{DOMAIN}. IN MX 10 {HOST}."),
        ("txt", DOMAIN, f'{DOMAIN}. IN TXT "v=spf1 mx -all"'),
        ("txt", f"._domainkey.{DOMAIN}", "._domainkey."),
        ("txt", f"_dmarc.{DOMAIN}", f"_dmarc.{DOMAIN}. IN TXT"),
        ("hosts", None, f"{HOST}. IN A <this server's public IPv4 address>"),
    ],
    ids=["mx", "spf", "dkim", "dmarc", "address"],
)
def test_each_missing_record_is_reported(
    server: PostofficeServer, tmp_path: Path, kind: str, name: str | None, line: str
) -> None:
    code, text = doctor(server, tmp_path, drop(good_zone(server), kind, name))
    assert code == 1
    missing = [r for r, s in statuses(text).items() if s == "missing" and line in r]
    assert missing, text
    assert "problem(s)" in text


def test_missing_reverse_dns(server: PostofficeServer, tmp_path: Path) -> None:
    zone = drop(good_zone(server), "hosts")
    code, text = doctor(
        server, tmp_path, zone, f"--address=/{HOST}/127.0.0.1", "--local=/in-addr.arpa/"
    )
    assert code == 1
    assert statuses(text)[f"1.0.0.127.in-addr.arpa. IN PTR {HOST}."] == "missing"
    assert "no reverse DNS for 127.0.0.1" in text


def test_missing_dkim_keys_say_how_to_make_them(tmp_path: Path) -> None:
    srv = PostofficeServer(
        tmp_path / "srv", hostname=HOST, domains=(DOMAIN,)
    )  # no keys, not running
    zone = good_zone(srv)
    code, text = doctor(srv, tmp_path, zone)
    assert code == 1
    assert f"run `postoffice dkim generate {DOMAIN}`" in text
    # Not running: every listener is reported as not answering.
    assert sum(1 for r, s in statuses(text).items() if "listener" in r and s == "wrong") == 7


def wrong(server: PostofficeServer, tmp_path: Path, zone: dict[str, Any], *args: str) -> str:
    code, text = doctor(server, tmp_path, zone, *args)
    assert code == 1, text
    return text


def test_wrong_mx(server: PostofficeServer, tmp_path: Path) -> None:
    zone = good_zone(server)
    zone["mx"] = [(DOMAIN, "mx.elsewhere.test", 10)]
    text = wrong(server, tmp_path, zone)
    assert statuses(text)[f"{DOMAIN}. IN MX 10 {HOST}."] == "wrong"
    assert f"MX points to mx.elsewhere.test, not to {HOST}" in text


@pytest.mark.parametrize(
    ("records", "words"),
    [
        ("v=spf1 ip4:192.0.2.1 -all", "gives fail for this server's address 127.0.0.1"),
        ("v=spf1 +all", "lets any address send"),
        (["v=spf1 mx -all", "v=spf1 a -all"], "2 SPF records"),
    ],
)
def test_wrong_spf(
    server: PostofficeServer, tmp_path: Path, records: str | list[str], words: str
) -> None:
    zone = good_zone(server)
    zone["txt"][DOMAIN] = records
    text = wrong(server, tmp_path, zone)
    assert statuses(text)[f'{DOMAIN}. IN TXT "v=spf1 mx -all"'] == "wrong"
    assert words in text


def test_wrong_dkim_key(server: PostofficeServer, tmp_path: Path) -> None:
    other = generate(tmp_path / "other", DOMAIN)
    zone = good_zone(server)
    for ours, theirs in zip(load_keys(server.data_dir, DOMAIN), other, strict=True):
        zone["txt"][ours.dns_name] = txt_record(theirs)
    text = wrong(server, tmp_path, zone)
    assert text.count("has a different key than") == 2


def test_wrong_dmarc_and_ptr(server: PostofficeServer, tmp_path: Path) -> None:
    zone = drop(good_zone(server), "hosts")
    zone["txt"][f"_dmarc.{DOMAIN}"] = "v=DMARC1; sp=reject"
    text = wrong(
        server,
        tmp_path,
        zone,
        f"--address=/{HOST}/127.0.0.1",
        "--ptr-record=1.0.0.127.in-addr.arpa,vps-1234.hoster.test",
    )
    assert "has no valid p= tag" in text
    assert f"points back to vps-1234.hoster.test, not to {HOST}" in text


def make_cert(path: Path, name: str, *, days: int, self_signed: bool = True) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = subject if self_signed else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


def cert_findings(tmp_path: Path, name: str, days: int, self_signed: bool = False) -> list[str]:
    cert = make_cert(tmp_path / f"{name}-{days}.pem", name, days=days, self_signed=self_signed)
    settings = Settings(hostname=HOST, tls=TlsSettings(cert=cert, key=cert))
    return [f"{f.status}: {f.reason}" for f in check_certificate(settings)]


def test_certificate_checks(tmp_path: Path) -> None:
    ok = cert_findings(tmp_path, HOST, 90)
    assert len(ok) == 1 and ok[0].startswith("ok: valid until")
    assert cert_findings(tmp_path, "*.example.test", 90)[0].startswith("ok")
    assert any(f.startswith("wrong: expired") for f in cert_findings(tmp_path, HOST, -1))
    assert any(f.startswith("warn: expires") for f in cert_findings(tmp_path, HOST, 5))
    assert any(
        f.startswith("wrong: made for other.test")
        for f in cert_findings(tmp_path, "other.test", 90)
    )
    assert any("self-signed" in f for f in cert_findings(tmp_path, HOST, 90, self_signed=True))


def test_listener_check_reports_a_closed_port(server: PostofficeServer, tmp_path: Path) -> None:
    settings = load_settings(server.config)
    closed = ListenAddress("127.0.0.1", free_port())
    settings = dataclasses.replace(
        settings,
        listen=dataclasses.replace(
            ListenSettings(), pop3=(closed,), smtp=(), submission=(), submissions=(), pop3s=()
        ),
    )
    dns = auth_dns(tmp_path, **good_zone(server)).start()
    try:
        out = io.StringIO()
        settings = with_dns(settings, dns)
        code = run_doctor(settings, lookups(settings), [DOMAIN], out)
    finally:
        dns.stop()
    assert code == 1
    assert statuses(out.getvalue())[f"pop3 listener {closed}"] == "wrong"


# --- a dead resolver, and addresses nobody else can reach (#19 item 11) -------------------


class BlackHole:
    """A "DNS server" that reads every query and never answers; it keeps the
    questions it was asked."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.questions: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wire = self.sock.recv(65535)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            self.questions += [q.name.to_text() for q in query.question]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_a_dead_resolver_is_asked_once(server: PostofficeServer) -> None:
    hole = BlackHole()
    try:
        settings = load_settings(server.config)
        dead = ListenAddress("127.0.0.1", hole.port)
        settings = dataclasses.replace(
            settings, relay=dataclasses.replace(settings.relay, dns_servers=(dead,))
        )
        out = io.StringIO()
        code = run_doctor(settings, lookups(settings), [DOMAIN], out)
    finally:
        hole.close()
    text = out.getvalue()
    assert code == 1
    assert statuses(text)[f"DNS resolver {dead}"] == "wrong"
    assert "does not answer" in text and "no record was checked" in text
    assert "DNS lookup failed" not in text  # not one timeout per record
    assert set(hole.questions) == {"."}  # the one probe (and its retries), nothing else
    # The checks that need no DNS still ran.
    assert f"smtp listener 127.0.0.1:{server.ports['smtp']}" in statuses(text)


@pytest.mark.parametrize(
    ("address", "kind"),
    [("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.9", "private")],
)
def test_a_public_host_name_on_a_private_address_is_wrong(
    server: PostofficeServer, tmp_path: Path, address: str, kind: str
) -> None:
    public = "mail.postoffice-doctor.net"  # a public TLD: the Internet must reach it
    zone = good_zone(server)
    zone["hosts"] = {public: [address]}
    dns = auth_dns(tmp_path, **zone)
    dns.args.append("--local=/postoffice-doctor.net/")  # answer AAAA: none
    dns.start()
    try:
        settings = dataclasses.replace(with_dns(load_settings(server.config), dns), hostname=public)
        out = io.StringIO()
        run_doctor(settings, lookups(settings), [], out)
    finally:
        dns.stop()
    text = out.getvalue()
    assert statuses(text)[f"{public}. IN A {address}"] == "wrong", text
    assert f"{address} is a {kind} address: other mail servers cannot reach {public}" in text


def test_special_use_names_are_test_setups() -> None:
    from postoffice.doctor import is_public_name

    for name in ("mail.example.test", "mx.example.com", "a.localhost", "x.home.arpa", "mail"):
        assert not is_public_name(name), name
    for name in ("mail.example.org.uk", "mx.postoffice.net", "a.b.de"):
        assert is_public_name(name), name


# --- client services: RFC 6186 SRV records, autoconfiguration names -------------------------
def srv_zone(srv: PostofficeServer, **changes: tuple[str, int]) -> list[tuple[str, str, int, int]]:
    """The SRV records the doctor asks for, as published; ``changes``: service
    label ("imaps") -> (target, port) published instead."""
    ports = srv.ports
    wanted = {
        "imaps": (HOST, ports["imaps"], 0),
        "pop3s": (HOST, ports["pop3s"], 10),
        "imap": (HOST, ports["imap"], 20),
        "pop3": (HOST, ports["pop3"], 30),
        "submissions": (HOST, ports["submissions"], 0),
        "submission": (HOST, ports["submission"], 10),
    }
    zone = []
    for label, (target, port, priority) in wanted.items():
        target, port = changes.get(label, (target, port))
        zone.append((f"_{label}._tcp.{DOMAIN}", target, port, priority))
    return zone


def with_https(settings: Settings, port: int) -> Settings:
    listen = dataclasses.replace(settings.listen, https=(ListenAddress("127.0.0.1", port),))
    return dataclasses.replace(settings, listen=listen)


def client_doctor(
    srv: PostofficeServer, tmp_path: Path, zone: dict[str, Any], https: int | None = None
) -> tuple[int, dict[str, str], str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    dns = auth_dns(tmp_path, **zone).start()
    try:
        settings = with_dns(load_settings(srv.config), dns)
        if https is not None:
            settings = with_https(settings, https)
        out = io.StringIO()
        code = run_doctor(settings, lookups(settings), [DOMAIN], out)
    finally:
        dns.stop()
    return code, statuses(out.getvalue()), out.getvalue()


def test_srv_records_checked(server: PostofficeServer, tmp_path: Path) -> None:
    ports = server.ports
    imaps = f"_imaps._tcp.{DOMAIN}. IN SRV 0 1 {ports['imaps']} {HOST}."
    submission = f"_submission._tcp.{DOMAIN}. IN SRV 10 1 {ports['submission']} {HOST}."
    # All published: ok, and the doctor passes.
    code, seen, text = client_doctor(
        server, tmp_path, {**good_zone(server), "srv": srv_zone(server)}
    )
    assert code == 0, text
    srv_lines = [r for r in seen if " IN SRV " in r]
    assert len(srv_lines) == 6 and all(seen[r] == "ok" for r in srv_lines), text
    assert seen[imaps] == "ok" and seen[submission] == "ok"
    # None published: recommended, so a warning each, not a failure.
    code, seen, text = client_doctor(server, tmp_path / "none", good_zone(server))
    assert code == 0, text
    assert seen[imaps] == "warn" and "RFC 6186" in text
    # A wrong port, another host, or "." for a service that is on: wrong.
    zone = srv_zone(server, imaps=(HOST, 993), submission=("mx.elsewhere.test", 587), pop3s=("", 0))
    code, seen, text = client_doctor(server, tmp_path / "bad", {**good_zone(server), "srv": zone})
    assert code == 1
    assert seen[imaps] == "wrong" and f"points to {HOST}:993" in text
    assert seen[submission] == "wrong" and "mx.elsewhere.test:587" in text
    pop3s = f"_pop3s._tcp.{DOMAIN}. IN SRV 10 1 {ports['pop3s']} {HOST}."
    assert seen[pop3s] == "wrong" and "not offered (target .)" in text


def test_autoconfig_names_checked_when_https_is_on(
    server: PostofficeServer, tmp_path: Path
) -> None:
    zone = {**good_zone(server), "srv": srv_zone(server)}
    zone["hosts"] = {**zone["hosts"], f"autoconfig.{DOMAIN}": ["127.0.0.1"]}
    code, seen, text = client_doctor(server, tmp_path, zone, https=8443)
    assert seen[f"autoconfig.{DOMAIN}. IN CNAME {HOST}."] == "ok", text
    assert seen[f"autodiscover.{DOMAIN}. IN CNAME {HOST}."] == "missing"
    assert seen[f"_autodiscover._tcp.{DOMAIN}. IN SRV 0 1 8443 {HOST}."] == "warn"
    assert code == 1
    zone["hosts"][f"autodiscover.{DOMAIN}"] = ["192.0.2.7"]
    _code, seen, text = client_doctor(server, tmp_path / "elsewhere", zone, https=8443)
    assert seen[f"autodiscover.{DOMAIN}. IN CNAME {HOST}."] == "wrong"
    assert f"resolves to 192.0.2.7, not to {HOST}" in text
