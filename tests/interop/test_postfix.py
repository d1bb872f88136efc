"""postoffice between real Postfix neighbours: Postfix relays to it, and it delivers to Postfix.

One Postfix instance (tests/interop/postfix.py) on 127.0.0.1 relays mail for
example.test to postoffice's port 25 and is the MX of remote.test (found
through dnsmasq).  Both directions use STARTTLS, pipelining and 8-bit
bodies; refusals on either side become proper bounces on the other.
Outside CI a missing Postfix or dnsmasq skips; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from tests.interop.postfix import POSTFIX, Postfix
from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    make_server,
    queued,
    submission,
    tls_context,
    wait_for,
)
from tests.support.peers import DNSMASQ, Dnsmasq
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

FILLER = "filler line, just text " * 3 + "\r\n"
BODY = "Caf\u00e9 cr\u00e8me.\r\n.a line with a dot\r\n" + FILLER * 6000  # 8-bit, 400 kB


def need(program: str) -> None:
    if not (shutil.which(program) or os.access(program, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (scripts/test.sh installs it)")
        pytest.skip(f"{program} is not installed")


@pytest.fixture(scope="module")
def neighbours(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PostofficeServer, Postfix]]:
    need(POSTFIX)
    need(DNSMASQ)
    root = tmp_path_factory.mktemp("postfix")
    pf_port = free_port()
    dns = Dnsmasq(
        root, mx=[("remote.test", "mx.remote.test", 10)], hosts={"mx.remote.test": ["127.0.0.1"]}
    ).start()
    srv = make_server(
        root / "po",
        relay={"mx_port": pf_port, "dns_servers": [dns.server], "retry_schedule": [1]},
    )
    tls = srv.data_dir / "tls"
    postfix = Postfix(
        relay_domain="example.test",
        relay_to=("127.0.0.1", srv.ports["smtp"]),
        local_domain="remote.test",
        users=["carol", "dave", "frank"],
        cert=tls / "cert.pem",
        key=tls / "key.pem",
        port=pf_port,
        # frank is accepted at RCPT, then bounced by Postfix itself (a late bounce).
        transport={"frank@remote.test": "error:5.2.1 mailbox disabled"},
    )
    try:
        postfix.start()
        yield srv, postfix
    finally:
        postfix.stop()
        srv.stop()
        dns.stop()
        postfix.cleanup()


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_postfix_relays_to_postoffice(neighbours: tuple[PostofficeServer, Postfix]) -> None:
    srv, postfix = neighbours
    message = (
        "From: Carol <carol@remote.test>\r\nTo: alice@example.test, bob@example.test\r\n"
        "Subject: through postfix\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + BODY
    ).encode()
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
        refused = client.sendmail(
            "carol@remote.test", [ALICE, BOB, "nobody@example.test"], message, ["BODY=8BITMIME"]
        )
    assert refused == {}  # Postfix queued all three; postoffice decides next
    assert wait_for(lambda: len(srv.messages(ALICE)) == 1 and len(srv.messages(BOB)) == 1, 30)
    content = srv.messages(ALICE)[0].read_bytes()
    assert srv.messages(ALICE)[0].stat().st_ino == srv.messages(BOB)[0].stat().st_ino  # linked
    assert b"by mail.example.test (postoffice) with ESMTPS id" in content  # Postfix used TLS
    assert b"by mx.remote.test (Postfix)" in content  # its own Received header, kept
    assert BODY.replace("\r\n", "\n").encode() in content  # 8-bit, dots, length intact

    # The unknown recipient is refused by postoffice with 550 5.1.1, and
    # Postfix bounces it to the sender, who is one of its own users.
    assert wait_for(lambda: len(postfix.mailbox("carol")) == 1, 30), postfix.log()
    bounce = parse(postfix.mailbox("carol")[0])
    assert bounce.get_content_type() == "multipart/report"
    report = bounce.get_payload()[1].as_string()  # type: ignore[index]
    assert "Final-Recipient: rfc822; nobody@example.test" in report
    assert re.search(r"Status: 5\.1\.1", report)
    assert "Remote-MTA: dns; 127.0.0.1" in report
    assert re.search(r"to=<alice@example\.test>.*status=sent", postfix.log())
    assert wait_for(postfix.queue_empty)


def test_postoffice_delivers_to_postfix(neighbours: tuple[PostofficeServer, Postfix]) -> None:
    srv, postfix = neighbours
    before = len(postfix.mailbox("carol"))
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}> BODY=8BITMIME")[0] == 250
    for rcpt in ("carol@remote.test", "dave@remote.test", "erin@remote.test"):
        assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250  # remote: decided by Postfix
    assert client.cmd("DATA")[0] == 354
    client.send(
        f"From: Alice <{ALICE}>\r\nTo: carol@remote.test\r\nSubject: to postfix\r\n\r\n".encode()
        + BODY.replace("\r\n.", "\r\n..").encode()  # dot-stuffed on the wire (RFC 5321 §4.5.2)
        + b".\r\n"
    )
    assert client.reply()[0] == 250
    client.cmd("QUIT")

    assert wait_for(
        lambda: len(postfix.mailbox("carol")) == before + 1 and len(postfix.mailbox("dave")) == 1,
        30,
    ), postfix.log()
    received = postfix.mailbox("dave")[0]
    assert b"Delivered-To: dave@remote.test" in received
    assert b"Delivered-To: carol@remote.test" in postfix.mailbox("carol")[-1]
    assert re.search(rb"Received: from mail\.example\.test \(\S+ \[127\.0\.0\.1\]\)", received)
    assert re.search(rb"\(using TLSv1\.[23] with cipher", received)  # STARTTLS to Postfix
    assert BODY.replace("\r\n", "\n").encode() in received
    assert b"Message-ID: <" in received

    # erin does not exist at Postfix: 550 there, a DSN here, nothing left queued.
    def dsn() -> list[EmailMessage]:
        return [
            m
            for m in (parse(p.read_bytes()) for p in srv.messages(ALICE))
            if "Undelivered" in str(m["Subject"])
        ]

    assert wait_for(lambda: len(dsn()) == 1, 30), srv.log()
    fields = dsn()[0].get_payload()[1].as_string()  # type: ignore[index]
    assert "Final-Recipient: rfc822; erin@remote.test" in fields
    assert "Status: 5.1.1" in fields
    assert "Remote-MTA: dns; mx.remote.test" in fields
    assert wait_for(lambda: queued(srv) == [])


def test_forwarding_through_srs_and_postfixs_own_bounce(
    neighbours: tuple[PostofficeServer, Postfix],
) -> None:
    """#11 item 10 with real Postfix on both sides of an alias: the forwarded
    copy reaches Postfix from an SRS0 sender of example.test; the bounce
    Postfix makes later for an address it accepted goes to that SRS address,
    and postoffice sends it on to the original sender (dave, at Postfix)."""
    srv, postfix = neighbours
    srv.cli("alias", "add", "to-carol@example.test", "carol@remote.test")
    srv.cli("alias", "add", "to-frank@example.test", "frank@remote.test")
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
        for alias in ("to-carol", "to-frank"):
            client.sendmail(
                "dave@remote.test",
                [f"{alias}@example.test"],
                f"From: dave@remote.test\r\nSubject: srs via {alias}\r\n\r\nhi\r\n".encode(),
            )

    # Found by content: Postfix names its Maildir files by second and inode, so
    # the newest file need not sort last, and mail of earlier tests may still
    # be arriving.
    def forwarded_copy() -> bytes | None:
        return next(
            (m for m in postfix.mailbox("carol") if b"Subject: srs via to-carol" in m), None
        )

    def frank_bounce() -> bytes | None:
        return next(
            (
                m
                for m in postfix.mailbox("dave")
                if b"frank@remote.test" in m and b"srs via to-frank" in m
            ),
            None,
        )

    assert wait_for(lambda: forwarded_copy() is not None, 30), postfix.log()
    forwarded = forwarded_copy()
    assert forwarded is not None
    # Postfix's virtual delivery writes the envelope sender it was given.
    assert re.search(
        rb"Return-Path: <SRS0=\S{6}=[A-Z2-7]{2}=remote\.test=dave@example\.test>", forwarded
    ), forwarded[:400]
    # frank: Postfix accepted, then bounced (error transport) to the SRS
    # address; postoffice checked it and relayed the bounce to dave.
    assert wait_for(lambda: frank_bounce() is not None, 30), postfix.log() + srv.log()
    raw_bounce = frank_bounce()
    assert raw_bounce is not None
    bounce = parse(raw_bounce)
    assert bounce.get_content_type() == "multipart/report"
    assert "Final-Recipient: rfc822; frank@remote.test" in bounce.as_string()
    # The bounce went through postoffice (Postfix -> SRS address -> dave), not
    # straight from Postfix to dave.
    assert re.search(
        r"to=<dave@remote\.test> relay=mx\.remote\.test\S* .*result=delivered", srv.log()
    )
    assert wait_for(lambda: queued(srv) == [])
    assert wait_for(postfix.queue_empty)


def _report(message: EmailMessage) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The per-message and per-recipient fields of a multipart/report (RFC 3464)."""
    assert message.get_content_type() == "multipart/report"
    status = list(message.iter_parts())[1]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    found = [{k.lower(): str(v) for k, v in b.items()} for b in blocks if not isinstance(b, str)]
    return found[0], found[1:]


def test_dsn_relayed_to_postfix_and_its_success_notice_comes_back(
    neighbours: tuple[PostofficeServer, Postfix],
) -> None:
    """RFC 3461 §5.2: Postfix offers DSN, so postoffice hands it NOTIFY,
    ORCPT, RET and ENVID and sends no notice itself; Postfix delivers and
    sends its own "delivered" DSN, which comes back through postoffice."""
    srv, postfix = neighbours
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as client:
        client.starttls(context=tls_context())
        client.login(ALICE, ALICE_PW)
        client.sendmail(
            ALICE,
            ["dave@remote.test"],
            f"From: {ALICE}\r\nTo: dave@remote.test\r\nSubject: dsn through postfix\r\n\r\nhi\r\n",
            ["RET=HDRS", "ENVID=po+2Benv-1"],
            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;dave@remote.test"],
        )

    def postfix_notice() -> EmailMessage | None:
        for path in srv.messages(ALICE):
            msg = parse(path.read_bytes())
            if "dsn through postfix" in msg.as_string() and msg.get_content_type() == (
                "multipart/report"
            ):
                return msg
        return None

    assert wait_for(lambda: postfix_notice() is not None, 30), postfix.log() + srv.log()
    notice = postfix_notice()
    assert notice is not None
    per_message, (rcpt,) = _report(notice)
    assert per_message["reporting-mta"] == "dns; mx.remote.test"  # Postfix's, not ours
    assert per_message["original-envelope-id"] == "po+env-1"
    assert rcpt["action"] == "delivered"
    assert rcpt["original-recipient"].replace(" ", "") == "rfc822;dave@remote.test"
    assert re.search(r"to=<dave@remote\.test>.*dsn=2\.0\.0, status=sent", postfix.log())
    # Postfix took the duty: postoffice sent no "relayed" notice of its own.
    assert not any(b"relayed" in p.read_bytes() for p in srv.messages(ALICE))
    assert wait_for(lambda: queued(srv) == [])


def test_postfix_relays_notify_success_and_gets_our_delivered_notice(
    neighbours: tuple[PostofficeServer, Postfix],
) -> None:
    """Postfix relays to postoffice with NOTIFY=SUCCESS (postoffice offers
    DSN); postoffice delivers into the mailbox and its "delivered" DSN goes
    back to the sender at Postfix, with ENVID and ORCPT in it."""
    srv, postfix = neighbours
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client:
        client.sendmail(
            "carol@remote.test",
            [BOB],
            b"From: carol@remote.test\r\nTo: bob@example.test\r\nSubject: notify me\r\n\r\nhi\r\n",
            ["ENVID=pf-42"],
            ["NOTIFY=SUCCESS", f"ORCPT=rfc822;{BOB}"],
        )

    def our_notice() -> bytes | None:
        return next(
            (m for m in postfix.mailbox("carol") if b"Reporting-MTA: dns; mail.example.test" in m),
            None,
        )

    assert wait_for(lambda: our_notice() is not None, 30), postfix.log() + srv.log()
    raw_notice = our_notice()
    assert raw_notice is not None
    per_message, (rcpt,) = _report(parse(raw_notice))
    assert per_message["original-envelope-id"] == "pf-42"
    assert rcpt["action"] == "delivered" and rcpt["status"] == "2.0.0"
    assert rcpt["final-recipient"] == f"rfc822; {BOB}"
    assert rcpt["original-recipient"] == f"rfc822; {BOB}"
    assert any(b"Subject: notify me" in p.read_bytes() for p in srv.messages(BOB))
    # Postfix passed NOTIFY on (it saw DSN in our EHLO) and left the rest to us.
    assert re.search(r"to=<bob@example\.test>.*status=sent", postfix.log())
    assert wait_for(lambda: queued(srv) == [])
    assert wait_for(postfix.queue_empty)
