"""BDAT (RFC 3030) and the 8BITMIME downgrade (RFC 6152) with a real Postfix.

One Postfix (tests/interop/postfix.py) relays example.test to postoffice
and is the MX of remote.test; it hides 8BITMIME from its EHLO
(``smtpd_discard_ehlo_keywords``) and offers CHUNKING, as it does by
default.  Postfix's session record names the command it was given
(``disconnect from ... bdat=N``), so the test sees BDAT used, not only a
message arriving.  The other direction cannot be shown with Postfix: its
SMTP client never sends BDAT (CHUNKING is a server-side feature in
Postfix); tests/integration/test_bdat.py drives our server's BDAT.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import dkim
import pytest

from tests.interop.postfix import POSTFIX, Postfix
from tests.interop.test_dkim_verifiers import txt_lines
from tests.interop.test_postfix import need
from tests.support.helpers import ALICE, ALICE_PW, queued, submission, wait_for
from tests.support.peers import DNSMASQ, Dnsmasq
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

TEXT = "Gr\u00fc\u00dfe aus K\u00f6ln, caf\u00e9 cr\u00e8me.\r\n.a dot line\r\n" + (
    "plain filler line of the body\r\n" * 3000
)


@pytest.fixture(scope="module")
def neighbours(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PostofficeServer, Postfix, dict[str, str]]]:
    need(POSTFIX)
    need(DNSMASQ)
    root = tmp_path_factory.mktemp("postfix-esmtp")
    pf_port = free_port()
    dns = Dnsmasq(
        root, mx=[("remote.test", "mx.remote.test", 10)], hosts={"mx.remote.test": ["127.0.0.1"]}
    ).start()
    srv = PostofficeServer(
        root / "po",
        sections={
            "relay": {"mx_port": pf_port, "dns_servers": [dns.server], "retry_schedule": [1]}
        },
    )
    srv.cli("dkim", "generate", "example.test")
    records = txt_lines(srv.cli("dkim", "show", "example.test").stdout)
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    tls = srv.data_dir / "tls"
    postfix = Postfix(
        relay_domain="example.test",
        relay_to=("127.0.0.1", srv.ports["smtp"]),
        local_domain="remote.test",
        users=["carol"],
        cert=tls / "cert.pem",
        key=tls / "key.pem",
        port=pf_port,
        extra="smtpd_discard_ehlo_keywords = 8bitmime\nsmtputf8_enable = no\n",
    )
    try:
        postfix.start()
        yield srv, postfix, records
    finally:
        postfix.stop()
        srv.stop()
        dns.stop()
        postfix.cleanup()


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_we_send_converted_8bit_mail_to_postfix_with_bdat(
    neighbours: tuple[PostofficeServer, Postfix, dict[str, str]],
) -> None:
    srv, postfix, records = neighbours
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}> BODY=8BITMIME")[0] == 250
    assert client.cmd("RCPT TO:<carol@remote.test>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    body = TEXT.replace("\r\n.", "\r\n..")  # dot-stuffed on the wire (RFC 5321 §4.5.2)
    client.send(
        f"From: Alice <{ALICE}>\r\nTo: carol@remote.test\r\nSubject: downgraded\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}.\r\n".encode()
    )
    assert client.reply()[0] == 250
    client.cmd("QUIT")
    assert wait_for(lambda: len(postfix.mailbox("carol")) == 1, 30), srv.log() + postfix.log()
    received = postfix.mailbox("carol")[0]
    assert not re.search(rb"[\x80-\xff]", received)  # 7-bit: Postfix offered no 8BITMIME
    msg = parse(received)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content() == TEXT.replace("\r\n", "\n")  # the same text once decoded

    # Our signature was made again over the converted body; Postfix's
    # Received: above it is not signed, so the message verifies as it arrived.
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    signed = received.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert signed.count(b"DKIM-Signature:") == 2
    d = dkim.DKIM(signed)
    assert [bool(d.verify(i, dnsfunc=dnsfunc)) for i in range(2)] == [True, True]
    # BDAT to Postfix, which offers CHUNKING: its smtpd says so.
    # (logged when our parked connection closes, seconds later: conncache.IDLE)
    bdat = re.compile(r"disconnect from \S+ .*\bbdat=\d")
    assert wait_for(lambda: bdat.search(postfix.log()) is not None, 15), postfix.log()
    assert not re.search(r"disconnect from \S+ .*\bdata=\d", postfix.log())
    assert wait_for(lambda: queued(srv) == [])


def test_smtputf8_mail_to_a_peer_without_it_bounces_clearly(
    neighbours: tuple[PostofficeServer, Postfix, dict[str, str]],
) -> None:
    srv, postfix, _ = neighbours
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as probe:
        probe.ehlo("probe.test")
        assert not probe.has_extn("smtputf8") and not probe.has_extn("8bitmime")
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}> SMTPUTF8")[0] == 250
    assert client.cmd("RCPT TO:<carol@remote.test>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(
        f"From: Alice <{ALICE}>\r\nTo: carol@remote.test\r\n"
        "Subject: Gr\u00fc\u00dfe\r\n\r\nbody\r\n.\r\n".encode()
    )
    assert client.reply()[0] == 250
    client.cmd("QUIT")

    def dsn() -> list[EmailMessage]:
        return [
            m
            for m in (parse(p.read_bytes()) for p in srv.messages(ALICE))
            if "Undelivered" in str(m["Subject"])
        ]

    # RFC 6531 §3.2: not sent without SMTPUTF8 (no downgrade), returned at once.
    assert wait_for(lambda: len(dsn()) == 1, 30), srv.log()
    parts = dsn()[0].get_payload()
    assert isinstance(parts, list)
    fields = str(parts[1])
    assert "Final-Recipient: rfc822; carol@remote.test" in fields
    assert "Status: 5.6.7" in fields
    assert "does not support SMTPUTF8" in str(parts[0])
    assert wait_for(lambda: queued(srv) == [])
    assert len(postfix.mailbox("carol")) <= 1  # nothing more reached Postfix
