"""Outbound TLS policy end to end: MTA-STS enforce/testing, [relay] tls = "verify",
REQUIRETLS (RFC 8461, RFC 8689).

The lab, all on loopback: dnsmasq serving MX, address and ``_mta-sts`` TXT
records; an https server (Python's http.server with TLS, in a thread)
serving each domain's policy at ``mta-sts.<domain>``; scripted peer MTAs
offering STARTTLS with certificates from a test CA that the server trusts
through ``[relay] ca_file`` (one named right, one named wrong, one from an
untrusted CA) and one offering no TLS at all.  The real server delivers mail
submitted over the submission port.
"""

from __future__ import annotations

import email
import gzip
import http.server
import json
import smtplib
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postoffice.delivery.mta_sts_fetch import MAX_POLICY_SIZE, StsLookup, StsPolicySource
from postoffice.delivery.tls_policy import verifying_context
from postoffice.dns.static import StaticResolver
from tests.integration.test_outbound import ALICE, dsn_for, report_fields
from tests.integration.test_tls_reports import recorded
from tests.support.certs import Pki, issue, make_pki
from tests.support.dns import auth_dns
from tests.support.helpers import wait_for
from tests.support.inprocess import run
from tests.support.peers import Dnsmasq, ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

POLICY_IP, GOOD_IP, WRONG_IP, UNTRUSTED_IP, PLAIN_IP, RT_IP, EXPIRED_IP = (
    "127.0.0.20",
    "127.0.0.21",
    "127.0.0.22",
    "127.0.0.23",
    "127.0.0.24",
    "127.0.0.25",
    "127.0.0.27",
)
# domain -> (MTA-STS mode or None, MX host, its address)
DOMAINS = {
    "good.test": ("enforce", "mx.good.test", GOOD_IP),
    "wrongname.test": ("enforce", "mx.wrongname.test", WRONG_IP),
    "untrusted.test": ("enforce", "mx.untrusted.test", UNTRUSTED_IP),
    "notlisted.test": ("enforce", "mx.good.test", GOOD_IP),  # policy lists another MX
    "testing.test": ("testing", "mx.wrongname.test", WRONG_IP),
    "nopolicy.test": (None, "mx.wrongname.test", WRONG_IP),
    "plain.test": ("enforce", "mx.plain.test", PLAIN_IP),
    "requiretls.test": ("enforce", "mx.requiretls.test", RT_IP),
    "expired.test": ("enforce", "mx.expired.test", EXPIRED_IP),
}
# Policy hosts that only the fetch test asks: one serves a policy over the
# size cap, one answers with a redirect to a good policy (RFC 8461 §3.3).
HUGE, REDIRECT = "huge.test", "redirect.test"
TLSRPT_RUA = "tlsrpt@good.test"  # expired.test asks for TLS reports there (its MX is "good")


def policy_text(domain: str) -> bytes:
    mode, mx, _ip = DOMAINS[domain]
    listed = "mx.elsewhere.test" if domain == "notlisted.test" else mx
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {listed}\r\nmax_age: 86400\r\n".encode()


class _PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").removeprefix("mta-sts.")
        if host == REDIRECT:
            self.send_response(301)
            self.send_header("Location", f"https://mta-sts.good.test{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if host == HUGE:
            # A valid policy but for its size: unknown keys are ignored (§3.2).
            pad = b"".join(b"x-pad: %060d\r\n" % i for i in range(MAX_POLICY_SIZE // 64 + 1))
            body = policy_text("good.test") + pad
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path != "/.well-known/mta-sts.txt" or host not in DOMAINS:
            self.send_error(404)
            return
        body = policy_text(host)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pki]:
    root = tmp_path_factory.mktemp("pki")
    names = [f"mta-sts.{d}" for d in (*DOMAINS, HUGE, REDIRECT)]
    ca = make_pki(root / "ca", names)  # the policy host's
    other = make_pki(root / "other", ["mx.untrusted.test"])  # a CA nobody trusts
    return {
        "policy": ca,
        "good": issue(ca, root / "good", ["mx.good.test"]),
        "wrong": issue(ca, root / "wrong", ["somebody-else.test"]),
        "untrusted": other,
        "requiretls": issue(ca, root / "rt", ["mx.requiretls.test"]),
        "expired": issue(ca, root / "expired", ["mx.expired.test"], expired=True),
    }


def _server_context(leaf: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    return ctx


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Pki]) -> Iterator[dict[str, Any]]:
    mx_port = free_port((GOOD_IP, WRONG_IP, UNTRUSTED_IP, PLAIN_IP, RT_IP, EXPIRED_IP))
    policy_port = free_port((POLICY_IP,))
    hosts: dict[str, list[str]] = {}
    txt: dict[str, str] = {}
    mx = []
    for domain, (mode, host, ip) in DOMAINS.items():
        hosts[host] = [ip]
        mx.append((domain, host, 10))
        if mode is not None:
            hosts[f"mta-sts.{domain}"] = [POLICY_IP]
            txt[f"_mta-sts.{domain}"] = "v=STSv1; id=20261205a;"
    txt["_smtp._tls.expired.test"] = f"v=TLSRPTv1; rua=mailto:{TLSRPT_RUA}"
    dns: Dnsmasq = auth_dns(tmp_path_factory.mktemp("dns"), txt=txt, hosts=hosts, mx=mx).start()
    https = http.server.ThreadingHTTPServer((POLICY_IP, policy_port), _PolicyHandler)
    https.socket = _server_context(pki["policy"]).wrap_socket(https.socket, server_side=True)
    thread = threading.Thread(target=https.serve_forever, daemon=True)
    thread.start()
    extensions = ("PIPELINING", "8BITMIME", "SIZE 10000000", "ENHANCEDSTATUSCODES")
    peers = {
        "good": ScriptedMta(GOOD_IP, mx_port, tls=_server_context(pki["good"])),
        "wrong": ScriptedMta(WRONG_IP, mx_port, tls=_server_context(pki["wrong"])),
        "untrusted": ScriptedMta(UNTRUSTED_IP, mx_port, tls=_server_context(pki["untrusted"])),
        "plain": ScriptedMta(PLAIN_IP, mx_port),
        "expired": ScriptedMta(EXPIRED_IP, mx_port, tls=_server_context(pki["expired"])),
        "requiretls": ScriptedMta(
            RT_IP,
            mx_port,
            extensions=(*extensions, "REQUIRETLS"),
            tls=_server_context(pki["requiretls"]),
        ),
    }
    for peer in peers.values():
        peer.start()
    try:
        yield {"dns": dns, "mx_port": mx_port, "policy_port": policy_port, "peers": peers}
    finally:
        for peer in peers.values():
            peer.stop()
        https.shutdown()
        https.server_close()
        dns.stop()


def make_server(
    root: Path, lab: dict[str, Any], pki: dict[str, Pki], **relay: Any
) -> PostofficeServer:
    settings = {
        "mx_port": lab["mx_port"],
        "dns_servers": [lab["dns"].server],
        "retry_schedule": [1],
        "connect_timeout": 5,
        "ca_file": str(pki["policy"].ca),
        "mta_sts_port": lab["policy_port"],
        **relay,
    }
    srv = PostofficeServer(root, sections={"relay": settings})
    srv.add_user(ALICE, "alice-password-1")
    return srv


def submit(
    srv: PostofficeServer,
    rcpt: str,
    subject: str,
    *,
    options: tuple[str, ...] = (),
    header: str = "",
) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15) as client:
        client.starttls(context=ctx)
        client.login(ALICE, "alice-password-1")
        msg = f"From: <{ALICE}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n{header}\r\nHello.\r\n"
        client.sendmail(ALICE, [rcpt], msg.encode(), mail_options=list(options))


def received(peer: ScriptedMta, subject: str) -> list[Any]:
    return [r for r in peer.received if f"Subject: {subject}".encode() in r.data]


def deferred(srv: PostofficeServer, rcpt: str, status: str = "4.7.5") -> bool:
    return any(
        f"to=<{rcpt}>" in line and "result=deferred" in line and f"status={status}" in line
        for line in srv.log().splitlines()
    )


@pytest.fixture
def server(tmp_path: Path, lab: dict[str, Any], pki: dict[str, Pki]) -> Iterator[PostofficeServer]:
    srv = make_server(tmp_path, lab, pki)
    srv.start()
    yield srv
    srv.stop()


def test_enforce_delivers_over_verified_tls_and_caches_the_policy(
    server: PostofficeServer, lab: dict[str, Any]
) -> None:
    good = lab["peers"]["good"]
    submit(server, "bob@good.test", "sts-good")
    assert wait_for(lambda: len(received(good, "sts-good")) == 1), server.log()
    assert received(good, "sts-good")[0].tls
    cached = server.data_dir / "mta-sts" / "good.test.json"
    assert cached.is_file()
    assert '"id": "20261205a"' in cached.read_text()


@pytest.mark.parametrize(
    ("domain", "peer"),
    [("wrongname.test", "wrong"), ("untrusted.test", "untrusted"), ("notlisted.test", "good")],
)
def test_enforce_defers_a_bad_certificate_or_unlisted_mx_never_plaintext(
    server: PostofficeServer, lab: dict[str, Any], domain: str, peer: str
) -> None:
    mta: ScriptedMta = lab["peers"][peer]
    subject = f"sts-bad-{domain}"
    submit(server, f"bob@{domain}", subject)
    assert wait_for(lambda: deferred(server, f"bob@{domain}")), server.log()
    assert received(mta, subject) == []
    # No plaintext retry: the peer never saw a MAIL command after a failed handshake.
    assert not any("bob@" + domain in c for c in mta.commands)


def test_testing_mode_delivers_and_logs(server: PostofficeServer, lab: dict[str, Any]) -> None:
    wrong = lab["peers"]["wrong"]
    submit(server, "bob@testing.test", "sts-testing")
    assert wait_for(lambda: len(received(wrong, "sts-testing")) == 1), server.log()
    log = server.log()
    assert "MTA-STS testing" in log and "certificate-host-mismatch" in log, log


def test_opportunistic_default_delivers_without_verification(
    server: PostofficeServer, lab: dict[str, Any]
) -> None:
    wrong = lab["peers"]["wrong"]
    submit(server, "bob@nopolicy.test", "no-policy")
    assert wait_for(lambda: len(received(wrong, "no-policy")) == 1), server.log()
    assert received(wrong, "no-policy")[0].tls


def test_relay_tls_verify_defers_a_bad_certificate(
    tmp_path: Path, lab: dict[str, Any], pki: dict[str, Pki]
) -> None:
    srv = make_server(tmp_path, lab, pki, tls="verify")
    srv.start()
    try:
        submit(srv, "carol@nopolicy.test", "verify-bad")
        assert wait_for(lambda: deferred(srv, "carol@nopolicy.test")), srv.log()
        assert received(lab["peers"]["wrong"], "verify-bad") == []
    finally:
        srv.stop()


def test_requiretls_to_a_plaintext_mx_bounces(
    server: PostofficeServer, lab: dict[str, Any]
) -> None:
    submit(server, "dave@plain.test", "rt-plain", options=("REQUIRETLS",))
    assert wait_for(lambda: len(dsn_for(server, "Undelivered")) == 1), server.log()
    (dsn,) = dsn_for(server, "Undelivered")
    _per_message, rcpt = report_fields(dsn)
    assert rcpt["final-recipient"] == "rfc822; dave@plain.test"
    assert rcpt["status"] == "5.7.10"
    assert received(lab["peers"]["plain"], "rt-plain") == []


def test_requiretls_without_a_policy_bounces(server: PostofficeServer, lab: dict[str, Any]) -> None:
    submit(server, "erin@nopolicy.test", "rt-nopolicy", options=("REQUIRETLS",))
    assert wait_for(lambda: len(dsn_for(server, "Undelivered")) == 1), server.log()
    assert received(lab["peers"]["wrong"], "rt-nopolicy") == []


def test_requiretls_goes_to_a_verified_requiretls_peer_with_the_parameter(
    server: PostofficeServer, lab: dict[str, Any]
) -> None:
    peer = lab["peers"]["requiretls"]
    submit(server, "frank@requiretls.test", "rt-good", options=("REQUIRETLS",))
    assert wait_for(lambda: len(received(peer, "rt-good")) == 1), server.log()
    (got,) = received(peer, "rt-good")
    assert got.tls and "REQUIRETLS" in got.mail_params.split()


def test_requiretls_needs_tls_on_submission(server: PostofficeServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=15) as client:
        client.ehlo("client.test")
        assert not client.has_extn("requiretls")  # RFC 8689 §4: only after STARTTLS
        code, _text = client.mail(ALICE, ["REQUIRETLS"])
        assert code == 530


def test_tls_required_no_lets_an_enforced_domain_go_unverified(
    server: PostofficeServer, lab: dict[str, Any]
) -> None:
    wrong = lab["peers"]["wrong"]
    submit(server, "gina@wrongname.test", "tls-optional", header="TLS-Required: No\r\n")
    assert wait_for(lambda: len(received(wrong, "tls-optional")) == 1), server.log()
    (got,) = received(wrong, "tls-optional")
    assert got.tls  # still encrypted when offered (RFC 8689 §5)
    assert b"TLS-Required: No" in got.data  # the header goes on unchanged


def test_policy_cache_refetch_and_fallback(
    tmp_path: Path, lab: dict[str, Any], pki: dict[str, Pki]
) -> None:
    """RFC 8461 §5.1 against the lab's https server: cached by id on disk,
    fetched again when the TXT id changes, kept when a fetch fails, dropped
    once expired; the fetch verifies the policy host's certificate."""
    trusted = verifying_context(str(pki["policy"].ca))
    cache = tmp_path / "mta-sts"

    def source(policy_id: str | None, ip: str, clock: float = 0.0) -> StsPolicySource:
        txt = {"_mta-sts.good.test": [f"v=STSv1; id={policy_id};"]} if policy_id else {}
        resolver = StaticResolver(hosts={"mta-sts.good.test": [ip]}, txt=txt)
        return StsPolicySource(
            cache,
            resolver,
            port=lab["policy_port"],
            timeout=5,
            clock=lambda: time.time() + clock,
        )

    first = run(source("one", POLICY_IP).lookup("good.test", trusted))
    assert first.policy is not None and first.policy.mode == "enforce" and not first.failure
    assert json.loads((cache / "good.test.json").read_text())["id"] == "one"
    # A new id whose fetch fails (nothing listens there): the cached policy stays.
    kept = run(source("two", "127.0.0.26").lookup("good.test", trusted))
    assert kept.policy == first.policy and kept.failure == "sts-policy-fetch-error"
    # The new id, fetched: cached under it.
    again = run(source("two", POLICY_IP).lookup("good.test", trusted))
    assert again.policy == first.policy and not again.failure
    assert json.loads((cache / "good.test.json").read_text())["id"] == "two"
    # TXT record gone: the cached policy holds until max_age, then nothing.
    assert run(source(None, POLICY_IP).lookup("good.test", trusted)).policy == first.policy
    assert run(source(None, POLICY_IP, clock=86401).lookup("good.test", trusted)).policy is None
    # The policy host's certificate is checked: without the test CA, no policy.
    (cache / "good.test.json").unlink()
    system_only = run(source("three", POLICY_IP).lookup("good.test", verifying_context("")))
    assert system_only == StsLookup(None, "sts-policy-fetch-error")


@pytest.mark.parametrize(
    ("domain", "why"), [(HUGE, f"larger than {MAX_POLICY_SIZE} bytes"), (REDIRECT, "HTTP 301")]
)
def test_policy_fetch_refuses_an_oversized_policy_and_a_redirect(
    tmp_path: Path,
    lab: dict[str, Any],
    pki: dict[str, Pki],
    caplog: pytest.LogCaptureFixture,
    domain: str,
    why: str,
) -> None:
    """RFC 8461 §3.3: a size cap, and redirects are not followed; either
    way no policy and nothing cached (the redirect target is a good policy,
    and the oversized one would parse but for its size)."""
    resolver = StaticResolver(
        hosts={f"mta-sts.{domain}": [POLICY_IP]},
        txt={f"_mta-sts.{domain}": ["v=STSv1; id=one;"]},
    )
    source = StsPolicySource(tmp_path / "mta-sts", resolver, port=lab["policy_port"], timeout=5)
    trusted = verifying_context(str(pki["policy"].ca))
    with caplog.at_level("WARNING", logger="postoffice.delivery"):
        found = run(source.lookup(domain, trusted))
    assert found == StsLookup(None, "sts-policy-fetch-error")
    assert why in caplog.text, caplog.text
    assert not (tmp_path / "mta-sts" / f"{domain}.json").exists()


def test_enforce_defers_an_expired_certificate_and_reports_it(
    tmp_path: Path, lab: dict[str, Any], pki: dict[str, Pki]
) -> None:
    """An MX whose certificate has expired, under an enforce policy: the
    mail waits (4.7.5), nothing reaches the MX, the session is recorded as
    certificate-expired, and the TLS report (RFC 8460) to the domain's rua
    names the sts policy, its lines and MX pattern, and the counts."""
    srv = make_server(tmp_path, lab, pki)
    srv.cli("dkim", "generate", "example.test")  # reports are DKIM-signed
    srv.start()
    expired, good = lab["peers"]["expired"], lab["peers"]["good"]
    try:
        submit(srv, "bob@expired.test", "sts-expired")
        assert wait_for(lambda: deferred(srv, "bob@expired.test")), srv.log()
        assert received(expired, "sts-expired") == []
        assert not any("bob@expired.test" in c for c in expired.commands)
        assert wait_for(lambda: recorded(srv).get("expired.test", 0) >= 1, 10), recorded(srv)
        srv.stop()  # no more retries: the counts hold still while the report is made
        counted = recorded(srv)["expired.test"]

        result = srv.cli("tlsrpt", "report", "--now")
        assert "  expired.test  sent  queued " in result.stdout, result.stdout
        srv.start()  # delivers the queued report to good.test's MX
        subject = "Report Domain: expired.test"
        assert wait_for(lambda: len(received(good, subject)) == 1, 20), srv.log()
    finally:
        srv.stop()
    (got,) = received(good, subject)
    assert [r.split()[0] for r in got.recipients] == [f"<{TLSRPT_RUA}>"], got.recipients
    msg = email.message_from_bytes(got.data)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    doc = json.loads(gzip.decompress(payload))
    (entry,) = doc["policies"]
    assert entry["policy"] == {
        "policy-type": "sts",
        "policy-string": [
            "version: STSv1",
            "mode: enforce",
            "mx: mx.expired.test",
            "max_age: 86400",
        ],
        "policy-domain": "expired.test",
        "mx-host": ["mx.expired.test"],
    }
    assert entry["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": counted,
    }
    (detail,) = entry["failure-details"]
    assert detail["result-type"] == "certificate-expired"
    assert detail["receiving-mx-hostname"] == "mx.expired.test"
    assert detail["receiving-ip"] == EXPIRED_IP
    assert detail["failed-session-count"] == counted
