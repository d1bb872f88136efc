"""DMARC aggregate reports (RFC 7489 §7.2) from the real server, with a real
DNS server (dnsmasq) publishing the senders' policies.

Mail arrives from a genuine sender (127.0.0.1, allowed by SPF, DKIM-signed)
and a forger (127.0.0.2) of sender.test, whose record asks for reports at
dmarc@reports.test: a local mailbox of the receiving server, outside
sender.test's organizational domain, so its consent record
(sender.test._report._dmarc.reports.test) is what lets the report go
(§7.1).  unverified.test asks for reports there without that consent;
norua.test asks for none.  ``postoffice dmarc report --now`` queues the
reports; the test reads the one that arrives, gunzips and parses it.
"""

from __future__ import annotations

import email
import email.message
import gzip
import re
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.policy.dkim_keys import KeyStore, generate, txt_record
from tests.integration import test_mailauth as ma
from tests.support.dns import auth_dns
from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq
from tests.support.server import PostofficeServer

REPORTS = "dmarc@reports.test"


@pytest.fixture(scope="module")
def signer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("sender-keys")
    generate(data, "sender.test")
    return data


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, signer_dir: Path) -> Iterator[Dnsmasq]:
    keys = KeyStore(signer_dir).keys_for("sender.test")
    server = auth_dns(
        tmp_path_factory.mktemp("dns"),
        txt={
            "sender.test": "v=spf1 ip4:127.0.0.1 -all",
            "_dmarc.sender.test": f"v=DMARC1; p=quarantine; rua=mailto:{REPORTS}!10m",
            "sender.test._report._dmarc.reports.test": "v=DMARC1",
            "unverified.test": "v=spf1 ip4:127.0.0.1 -all",
            "_dmarc.unverified.test": f"v=DMARC1; p=none; rua=mailto:{REPORTS}",
            "norua.test": "v=spf1 ip4:127.0.0.1 -all",
            "_dmarc.norua.test": "v=DMARC1; p=reject",
            **{k.key.dns_name: txt_record(k.key) for k in keys},
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(
        tmp_path_factory.mktemp("receiver"),
        domains=("receiver.test", "reports.test"),
        hostname=ma.RX_HOST,
        sections={
            "checks": {"exempt_networks": ["::1/128"]},
            "relay": {"dns_servers": [dns.server]},
        },
    )
    srv.add_user(ma.BOB, "bob-password-3")
    srv.add_user(REPORTS, "reports-password-3")
    srv.cli("dkim", "generate", "receiver.test")  # reports are signed with it
    srv.start()
    yield srv
    srv.stop()


def recorded(srv: PostofficeServer) -> dict[str, int]:
    """Messages counted per policy domain, open or sealed (the store's file)."""
    path = srv.data_dir / "dmarc" / "reports.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        try:
            found = db.execute("SELECT domain, SUM(count) FROM rows GROUP BY domain").fetchall()
        except sqlite3.OperationalError:  # not made yet
            return {}
    return {domain: total for domain, total in found}


def attachment(msg: email.message.Message) -> tuple[str, bytes]:
    for part in msg.walk():
        if part.get_content_type() == "application/gzip":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return part.get_filename() or "", payload
    raise AssertionError("no gzip attachment")


def rows(root: ET.Element) -> dict[str, ET.Element]:
    return {r.findtext("row/source_ip") or "": r for r in root.findall("record")}


def test_reports_count_genuine_and_forged_mail_and_need_consent(
    receiver: PostofficeServer, signer_dir: Path
) -> None:
    genuine = ma.sign(signer_dir, ma.message(body="Genuine.\n"))
    assert ma.send(receiver, genuine)[0] == 250
    for n in range(2):  # a forger elsewhere: SPF fails, no signature
        forged = ma.message(body=f"Forged {n}.\n")
        assert ma.send(receiver, forged, source="127.0.0.2")[0] == 250
    unverified = ma.message("carol@unverified.test", body="Unverified.\n")
    assert ma.send(receiver, unverified, sender="carol@unverified.test")[0] == 250
    # No rua=: nothing recorded, whatever the sender (a null sender here).
    norua = ma.message("dave@norua.test", body="No reports.\n")
    assert ma.send(receiver, ma.sign(signer_dir, norua), sender="")[0] in (250, 550)
    assert wait_for(lambda: recorded(receiver) == {"sender.test": 3, "unverified.test": 1}, 10), (
        recorded(receiver)
    )

    before = len(receiver.messages(REPORTS))
    result = receiver.cli("dmarc", "report", "--now")
    lines = result.stdout.splitlines()
    assert any(" sender.test  sent  queued " in line for line in lines), result.stdout
    assert any(
        " unverified.test  dropped  " in line and "_report._dmarc" in line for line in lines
    ), result.stdout
    assert wait_for(lambda: len(receiver.messages(REPORTS)) == before + 1, 15), receiver.log()
    content = max(receiver.messages(REPORTS), key=lambda p: p.stat().st_mtime_ns).read_bytes()
    msg = email.message_from_bytes(content)

    # §7.2.1.1: the subject and the file name; signed with our domain's key.
    subject = str(msg["Subject"])
    match = re.fullmatch(
        rf"Report Domain: sender\.test Submitter: {re.escape(ma.RX_HOST)} Report-ID: <(\w+)>",
        subject,
    )
    assert match, subject
    assert msg["From"] == "DMARC reports <postmaster@receiver.test>"
    assert "d=receiver.test" in str(msg["DKIM-Signature"]).replace(" ", "")
    name, gz = attachment(msg)
    assert re.fullmatch(rf"{re.escape(ma.RX_HOST)}!sender\.test!(\d+)!(\d+)\.xml\.gz", name), name

    root = ET.fromstring(gzip.decompress(gz))
    assert root.findtext("report_metadata/org_name") == ma.RX_HOST
    assert root.findtext("report_metadata/email") == "postmaster@receiver.test"
    assert root.findtext("report_metadata/report_id") == match.group(1)
    begin = int(root.findtext("report_metadata/date_range/begin") or 0)
    end = int(root.findtext("report_metadata/date_range/end") or 0)
    assert begin % 86400 == 0 and begin <= end, (begin, end)
    assert name.endswith(f"!{begin}!{end}.xml.gz")
    assert root.findtext("policy_published/domain") == "sender.test"
    assert root.findtext("policy_published/p") == "quarantine"
    by_ip = rows(root)
    assert set(by_ip) == {"127.0.0.1", "127.0.0.2"}, ET.tostring(root)

    good = by_ip["127.0.0.1"]
    assert good.findtext("row/count") == "1"
    assert good.findtext("row/policy_evaluated/disposition") == "none"
    assert good.findtext("row/policy_evaluated/dkim") == "pass"
    assert good.findtext("row/policy_evaluated/spf") == "pass"
    assert good.findtext("identifiers/header_from") == "sender.test"
    assert good.findtext("auth_results/dkim/domain") == "sender.test"
    assert good.findtext("auth_results/dkim/result") == "pass"
    assert good.findtext("auth_results/spf/result") == "pass"

    bad = by_ip["127.0.0.2"]
    assert bad.findtext("row/count") == "2"
    assert bad.findtext("row/policy_evaluated/disposition") == "quarantine"
    assert bad.findtext("row/policy_evaluated/dkim") == "fail"
    assert bad.findtext("row/policy_evaluated/spf") == "fail"
    assert bad.find("auth_results/dkim") is None
    assert bad.findtext("auth_results/spf/domain") == "sender.test"
    assert bad.findtext("auth_results/spf/scope") == "mfrom"
    assert bad.findtext("auth_results/spf/result") == "fail"

    # Sent once: the rows are gone, a second run finds nothing to send.
    assert recorded(receiver) == {}
    again = receiver.cli("dmarc", "report", "--now")
    assert "no DMARC reports due" in again.stdout, again.stdout
    assert not wait_for(lambda: len(receiver.messages(REPORTS)) > before + 1, 2)
