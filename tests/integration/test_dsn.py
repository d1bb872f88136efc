"""DSN (RFC 3461) end to end: the real server, a real DNS server, real peers.

Mail is submitted with NOTIFY, ORCPT, RET and ENVID over the submission
port (smtplib); the next hop is a scripted MTA that offers DSN or not, and
the notices arrive in the sender's own mailbox as real multipart/report
messages (RFC 3464), read back with the email package.  The notices are
DKIM-signed with the domain's key and verified with dkimpy against the
test DNS server.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import dkim
import dns.resolver
import pytest

from tests.support.helpers import ALICE, ALICE_PW, BOB, tls_context, wait_for
from tests.support.peers import Dnsmasq, ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

MX = "127.0.0.2"
DSN_PEER = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN")
PLAIN_PEER = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")


@pytest.fixture
def port() -> int:
    return free_port((MX,))


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path / "dns", mx=[("remote.test", "mx.remote.test", 10)], hosts={"mx.remote.test": [MX]}
    )
    (tmp_path / "dns").mkdir()
    yield server
    server.stop()


def make_server(tmp_path: Path, dns_server: Dnsmasq, port: int) -> PostofficeServer:
    srv = PostofficeServer(
        tmp_path / "po",
        sections={
            "relay": {
                "mx_port": port,
                "dns_servers": [dns_server.server],
                "retry_schedule": [1],
                "connect_timeout": 5,
            }
        },
    )
    srv.add_user(ALICE, ALICE_PW)
    srv.add_user(BOB, "bob-password-2")
    return srv


def ok(_address: str) -> str:
    return "250 2.1.5 Ok"


def refuse(_address: str) -> str:
    return "550 5.1.1 no such user"


def peer(
    port: int, extensions: tuple[str, ...], rcpt_reply: Callable[[str], str] = ok
) -> ScriptedMta:
    return ScriptedMta(MX, port, extensions=extensions, rcpt_reply=rcpt_reply).start()


def send(
    srv: PostofficeServer,
    rcpts: list[str],
    *,
    mail_options: tuple[str, ...] = (),
    rcpt_options: tuple[str, ...] = (),
    subject: str = "hello",
) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15) as client:
        client.starttls(context=tls_context())
        client.login(ALICE, ALICE_PW)
        msg = (
            f"From: Alice <{ALICE}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\nHi.\r\n"
        )
        client.sendmail(ALICE, rcpts, msg.encode(), list(mail_options), list(rcpt_options))


def notices(srv: PostofficeServer, subject_word: str) -> list[EmailMessage]:
    found = []
    for path in srv.messages(ALICE):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        if subject_word in str(msg["Subject"]):
            found.append(msg)
    return found


def fields(notice: EmailMessage) -> list[dict[str, str]]:
    parts = list(notice.iter_parts())
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [{k.lower(): str(v) for k, v in b.items()} for b in blocks if not isinstance(b, str)]


def test_dsn_parameters_go_to_a_dsn_peer_and_it_reports_success(
    tmp_path: Path, dns_server: Dnsmasq, port: int
) -> None:
    """RFC 3461 §5.2: a next hop offering DSN gets RET, ENVID, NOTIFY and
    ORCPT unchanged, and success is its job: we send no notice."""
    dns_server.start()
    mta = peer(port, DSN_PEER)
    srv = make_server(tmp_path, dns_server, port)
    srv.start()
    try:
        send(
            srv,
            ["bob@remote.test"],
            mail_options=("RET=HDRS", "ENVID=QQ314159"),
            rcpt_options=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+2Bx@remote.test"),
        )
        assert wait_for(lambda: len(mta.received) == 1), srv.log()
        assert re.search(r"RET=HDRS", mta.received[0].mail_params)
        assert "ENVID=QQ314159" in mta.received[0].mail_params
        (rcpt,) = [c for c in mta.commands if c.startswith("RCPT")]
        assert rcpt == (
            "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@remote.test"
        )
        assert wait_for(lambda: "result=delivered" in srv.log())
        assert notices(srv, "Successful") == []
    finally:
        srv.stop()
        mta.stop()


def test_relayed_notice_for_a_peer_without_dsn(
    tmp_path: Path, dns_server: Dnsmasq, port: int
) -> None:
    """RFC 3461 §5.2.2: without DSN at the next hop the parameters are not
    sent, and NOTIFY=SUCCESS gets a "relayed" notice from us, with ENVID and
    ORCPT in it (RFC 3464 §2.2.1, §2.3.1), DKIM-signed."""
    dns_server.start()
    mta = peer(port, PLAIN_PEER)
    srv = make_server(tmp_path, dns_server, port)
    srv.start()
    try:
        send(
            srv,
            ["bob@remote.test"],
            mail_options=("ENVID=QQ314159",),
            rcpt_options=("NOTIFY=SUCCESS", "ORCPT=rfc822;bob+2Bx@remote.test"),
            subject="relay me",
        )
        assert wait_for(lambda: len(mta.received) == 1), srv.log()
        assert "ENVID" not in mta.received[0].mail_params
        assert "RCPT TO:<bob@remote.test>" in mta.commands
        assert wait_for(lambda: len(notices(srv, "Successful")) == 1), srv.log()
        (notice,) = notices(srv, "Successful")
        per_message, rcpt = fields(notice)
        assert per_message["original-envelope-id"] == "QQ314159"
        assert per_message["reporting-mta"] == "dns; mail.example.test"
        assert rcpt["action"] == "relayed" and rcpt["status"] == "2.0.0"
        assert rcpt["original-recipient"] == "rfc822; bob+x@remote.test"
        assert rcpt["final-recipient"] == "rfc822; bob@remote.test"
        assert "Subject: relay me" in str(list(notice.iter_parts())[2])
    finally:
        srv.stop()
        mta.stop()


def test_local_delivery_success_and_never_and_full_return(
    tmp_path: Path, dns_server: Dnsmasq, port: int
) -> None:
    """NOTIFY=SUCCESS to a local mailbox: "delivered"; NOTIFY=NEVER on a
    refused recipient: no bounce; RET=FULL with NOTIFY=FAILURE: the whole
    message comes back (RFC 3461 §4.3)."""
    dns_server.start()
    mta = peer(port, PLAIN_PEER, rcpt_reply=refuse)
    srv = make_server(tmp_path, dns_server, port)
    srv.start()
    try:
        send(srv, [BOB], rcpt_options=("NOTIFY=SUCCESS",), subject="local one")
        assert wait_for(lambda: len(srv.messages(BOB)) == 1), srv.log()
        assert wait_for(lambda: len(notices(srv, "Successful")) == 1), srv.log()
        (_m, rcpt) = fields(notices(srv, "Successful")[0])
        assert rcpt["action"] == "delivered" and rcpt["final-recipient"] == f"rfc822; {BOB}"
        assert b"Subject: local one" in srv.messages(BOB)[0].read_bytes()

        send(srv, ["nobody@remote.test"], rcpt_options=("NOTIFY=NEVER",), subject="quiet")
        assert wait_for(lambda: "result=failed" in srv.log() or "result=bounced" in srv.log())
        send(
            srv,
            ["gone@remote.test"],
            mail_options=("RET=FULL",),
            rcpt_options=("NOTIFY=FAILURE",),
            subject="loud",
        )
        assert wait_for(lambda: len(notices(srv, "Undelivered")) == 1), srv.log()
        assert wait_for(lambda: not list((srv.data_dir / "queue").glob("*.msg")))
        (bounce,) = notices(srv, "Undelivered")  # "quiet" got none
        returned = list(bounce.iter_parts())[2]
        assert returned.get_content_type() == "message/rfc822"
        assert "Subject: loud" in str(returned) and "Hi." in str(returned)
    finally:
        srv.stop()
        mta.stop()


def test_notices_are_dkim_signed_with_the_domains_key(
    tmp_path: Path, dns_server: Dnsmasq, port: int
) -> None:
    """A bounce is signed like submitted mail (policy/dkim_sign.py), d= our
    domain; dkimpy verifies it with the key published in the test DNS."""
    mta = peer(port, PLAIN_PEER, rcpt_reply=refuse)
    srv = make_server(tmp_path, dns_server, port)
    out = srv.cli("dkim", "generate", "example.test").stdout
    for line in out.splitlines():
        if " IN TXT " in line:
            name = line.split(". IN TXT", 1)[0]
            value = "".join(re.findall(r'"([^"]*)"', line))
            dns_server.args.append(f"--txt-record={name},{value}")
    dns_server.start()
    srv.start()
    try:
        send(srv, ["nobody@remote.test"], subject="signed bounce")
        assert wait_for(lambda: len(notices(srv, "Undelivered")) == 1), srv.log()
        raw = srv.messages(ALICE)[0].read_bytes()
        message = raw.split(b"\n", 1)[1]  # the Return-Path local delivery put on top
        header = message.split(b"\n\n", 1)[0]  # (the quoted original is signed too)
        assert header.count(b"DKIM-Signature:") == 2  # RSA and Ed25519
        assert b" d=example.test;" in header

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = dns_server.port

        def txt(name: bytes, timeout: int = 5) -> bytes:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
            return b"".join(b"".join(r.strings) for r in answer)

        crlf = message.replace(b"\n", b"\r\n")
        verifier = dkim.DKIM(crlf)
        assert verifier.verify(idx=0, dnsfunc=txt) and verifier.verify(idx=1, dnsfunc=txt)
    finally:
        srv.stop()
        mta.stop()
