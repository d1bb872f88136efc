"""SMTP TLS reports (RFC 8460) on our outbound mail, end to end.

The sending postoffice (127.0.0.1) relays through a real DNS server
(dnsmasq) to two domains: tls.test, whose MX is a second postoffice
(127.0.0.2) offering STARTTLS, and plain.test, whose MX is Postfix's
smtp-sink (127.0.0.3) without STARTTLS.  Both publish
``_smtp._tls.<domain>`` asking for reports at reports@reports.test, a
mailbox of the second postoffice; nothls.test publishes no record.
``postoffice tlsrpt report --now`` queues the reports; the test reads the
mails that arrive, gunzips the JSON and checks its fields and counts.
"""

from __future__ import annotations

import datetime
import email
import email.message
import gzip
import json
import re
import smtplib
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dns import auth_dns
from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq, SmtpSink
from tests.support.server import PostofficeServer

MX_TLS, MX_PLAIN = "127.0.0.2", "127.0.0.3"
REPORTS = "reports@reports.test"
ALICE = "alice@sender.test"
SUBMITTER = "mail.sender.test"
RUA = f"v=TLSRPTv1; rua=mailto:{REPORTS}"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    # Made first: its smtp port is the [relay] mx_port every MX shares.
    srv = PostofficeServer(
        tmp_path_factory.mktemp("receiver"),
        domains=("tls.test", "nothls.test", "reports.test"),
        hostname="mx.tls.test",
        host=MX_TLS,
    )
    srv.add_user("bob@tls.test", "bob-password-4")
    srv.add_user("carol@nothls.test", "carol-password-4")
    srv.add_user(REPORTS, "reports-password-4")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = auth_dns(
        tmp_path_factory.mktemp("dns"),
        mx=[
            ("tls.test", "mx.tls.test", 10),
            ("nothls.test", "mx.tls.test", 10),
            ("reports.test", "mx.tls.test", 10),
            ("plain.test", "mx.plain.test", 10),
        ],
        hosts={"mx.tls.test": [MX_TLS], "mx.plain.test": [MX_PLAIN]},
        txt={"_smtp._tls.tls.test": RUA, "_smtp._tls.plain.test": RUA},
    ).start()
    yield server
    server.stop()


@pytest.fixture
def plain_mx(
    tmp_path: Path, receiver: PostofficeServer, require_program: Any
) -> Iterator[SmtpSink]:
    require_program("smtp-sink")
    sink = SmtpSink(tmp_path, MX_PLAIN, receiver.ports["smtp"], name="plain").start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def sender(
    tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq, receiver: PostofficeServer
) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(
        tmp_path_factory.mktemp("sender"),
        domains=("sender.test",),
        hostname=SUBMITTER,
        sections={
            "relay": {
                "mx_port": receiver.ports["smtp"],
                "dns_servers": [dns.server],
                "retry_schedule": [1],
                "connect_timeout": 5,
            }
        },
    )
    srv.add_user(ALICE, "alice-password-4")
    srv.cli("dkim", "generate", "sender.test")  # reports are signed with it
    srv.start()
    yield srv
    srv.stop()


def submit(srv: PostofficeServer, rcpt: str, subject: str) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15) as client:
        client.starttls(context=ctx)
        client.login(ALICE, "alice-password-4")
        msg = f"From: <{ALICE}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\nHello.\r\n"
        client.sendmail(ALICE, [rcpt], msg.encode())


def recorded(srv: PostofficeServer) -> dict[str, int]:
    """Sessions counted per policy domain (successes and failures), from the store."""
    path = srv.data_dir / "tlsrpt" / "reports.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        try:
            found = db.execute(
                "SELECT domain, SUM(count) FROM counts WHERE key IN ('+', '-') GROUP BY domain"
            ).fetchall()
        except sqlite3.OperationalError:
            return {}
    return dict(found)


def report_of(path: Path) -> tuple[email.message.Message, str, dict[str, Any]]:
    msg = email.message_from_bytes(path.read_bytes())
    for part in msg.walk():
        if part.get_content_type() == "application/tlsrpt+gzip":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return msg, part.get_filename() or "", json.loads(gzip.decompress(payload))
    raise AssertionError(f"no application/tlsrpt+gzip part in {path}")


def test_reports_count_tls_and_plaintext_sessions(
    sender: PostofficeServer, receiver: PostofficeServer, plain_mx: SmtpSink
) -> None:
    submit(sender, "bob@tls.test", "over tls")
    assert wait_for(lambda: len(receiver.messages("bob@tls.test")) == 1, 20), sender.log()
    submit(sender, "dave@plain.test", "in the clear")
    assert wait_for(lambda: len(plain_mx.messages()) == 1, 20), sender.log()
    submit(sender, "carol@nothls.test", "no reports asked")
    assert wait_for(lambda: len(receiver.messages("carol@nothls.test")) == 1, 20)
    # Recorded by the delivering process's writer thread, soon after.
    want = {"tls.test": 1, "plain.test": 1, "nothls.test": 1}
    assert wait_for(lambda: recorded(sender) == want, 10), recorded(sender)

    result = sender.cli("tlsrpt", "report", "--now")
    lines = result.stdout.splitlines()
    for domain in ("tls.test", "plain.test"):
        assert any(f"  {domain}  sent  queued " in line for line in lines), result.stdout
    assert any("  nothls.test  dropped  " in line for line in lines), result.stdout
    assert wait_for(lambda: len(receiver.messages(REPORTS)) == 2, 20), sender.log()

    reports = {}
    for path in receiver.messages(REPORTS):
        msg, name, document = report_of(path)
        domain = str(msg["TLS-Report-Domain"])
        reports[domain] = (msg, name, document)
    assert set(reports) == {"tls.test", "plain.test"}

    for domain, (msg, name, doc) in reports.items():
        # §5.3: the media type, the subject, the two header fields; DKIM-signed.
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "tlsrpt"
        match = re.fullmatch(
            rf"Report Domain: {re.escape(domain)} Submitter: {SUBMITTER} Report-ID: <(\w+)>",
            str(msg["Subject"]),
        )
        assert match, msg["Subject"]
        assert msg["TLS-Report-Submitter"] == SUBMITTER
        assert "d=sender.test" in str(msg["DKIM-Signature"]).replace(" ", "")
        # §4.4: the document.
        assert doc["organization-name"] == SUBMITTER
        assert doc["contact-info"] == "postmaster@sender.test"
        assert doc["report-id"] == match.group(1)
        start = datetime.datetime.strptime(
            doc["date-range"]["start-datetime"], "%Y-%m-%dT%H:%M:%SZ"
        ).replace(tzinfo=datetime.UTC)
        end = datetime.datetime.strptime(
            doc["date-range"]["end-datetime"], "%Y-%m-%dT%H:%M:%SZ"
        ).replace(tzinfo=datetime.UTC)
        assert start.time() == datetime.time(0) and start <= end, doc["date-range"]
        # §5.1: the file name.
        begin_ts, end_ts = int(start.timestamp()), int(end.timestamp())
        assert name == f"{SUBMITTER}!{domain}!{begin_ts}!{end_ts}.json.gz", name
        (entry,) = doc["policies"]
        assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": domain}

    tls_doc = reports["tls.test"][2]["policies"][0]
    assert tls_doc["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 0,
    }
    assert "failure-details" not in tls_doc
    plain_doc = reports["plain.test"][2]["policies"][0]
    assert plain_doc["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": 1,
    }
    assert plain_doc["failure-details"] == [
        {
            "result-type": "starttls-not-supported",
            "sending-mta-ip": "127.0.0.1",
            "receiving-mx-hostname": "mx.plain.test",
            "receiving-ip": MX_PLAIN,
            "failed-session-count": 1,
        }
    ]

    # Sent once: a second run finds only what the report mails' own
    # sessions added (reports.test, which asks for no reports).
    again = sender.cli("tlsrpt", "report", "--now")
    assert " tls.test " not in again.stdout and " plain.test " not in again.stdout, again.stdout
