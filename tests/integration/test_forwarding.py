"""Forwarded mail and SRS end to end (#11 item 10): the real server, dnsmasq, two peer MTAs.

An alias of example.test forwards port-25 mail to remote.test, whose MX
(127.0.0.2) is a scripted MTA that records MAIL FROM and refuses one
recipient; the original sender's domain, elsewhere.test, has its MX on
127.0.0.3.  Forwarded mail must leave with an SRS0 sender of example.test;
a downstream refusal must bounce, headers only, to the original sender; a
bounce sent to the SRS address must reach the original sender too; forged,
expired and non-bounce use of SRS addresses is refused at RCPT.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from postoffice.mail.address import Address, parse_path
from postoffice.policy.srs import Srs, load_secrets
from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq, Received, ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

REMOTE_MX, SENDER_MX = "127.0.0.2", "127.0.0.3"
SOMEONE = "someone@elsewhere.test"


@dataclass
class Net:
    srv: PostofficeServer
    remote: ScriptedMta  # remote.test's MX: where the alias forwards to
    origin: ScriptedMta  # elsewhere.test's MX: the original sender's

    def srs(self) -> Srs:
        return Srs(load_secrets(self.srv.data_dir))


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("forwarding")
    dns = Dnsmasq(
        root,
        mx=[("remote.test", "mx.remote.test", 10), ("elsewhere.test", "mx.elsewhere.test", 10)],
        hosts={"mx.remote.test": [REMOTE_MX], "mx.elsewhere.test": [SENDER_MX]},
    ).start()
    port = free_port((REMOTE_MX, SENDER_MX))
    remote = ScriptedMta(
        REMOTE_MX,
        port,
        rcpt_reply=lambda a: (
            "550 5.1.1 No such user" if a.startswith("refuse@") else "250 2.1.5 Ok"
        ),
    ).start()
    origin = ScriptedMta(SENDER_MX, port).start()
    srv = PostofficeServer(
        root / "po",
        sections={
            "relay": {
                "mx_port": port,
                "dns_servers": [dns.server],
                "retry_schedule": [1],
                "connect_timeout": 5,
            }
        },
    )
    srv.add_user("bob@example.test", "bob-password-2")
    srv.cli("alias", "add", "fwd@example.test", "bob@example.test", "carol@remote.test")
    srv.cli("alias", "add", "gone@example.test", "refuse@remote.test")
    srv.start()
    try:
        yield Net(srv, remote, origin)
    finally:
        srv.stop()
        remote.stop()
        origin.stop()
        dns.stop()


def smtp_send(net: Net, sender: str, rcpts: list[str], message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.sendmail(sender, rcpts, message)


def rcpt_reply(net: Net, sender: str, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.ehlo("bounces.remote.test")
        code, _ = client.mail(sender)
        assert code == 250
        return client.rcpt(rcpt)


def arrived(mta: ScriptedMta, marker: bytes) -> list[Received]:
    return [r for r in list(mta.received) if marker in r.data]


def path(text: str) -> Address:
    parsed = parse_path(text)
    assert parsed is not None
    return parsed


def test_forwarded_mail_leaves_with_an_srs_sender(net: Net) -> None:
    smtp_send(
        net,
        SOMEONE,
        ["fwd@example.test"],
        b"From: someone@elsewhere.test\r\nSubject: fwd-srs-1\r\n\r\nhello\r\n",
    )
    assert wait_for(lambda: len(arrived(net.remote, b"fwd-srs-1")) == 1), net.srv.log()
    (msg,) = arrived(net.remote, b"fwd-srs-1")
    assert msg.recipients == ["<carol@remote.test>"]
    sender = path(msg.sender)
    # RFC-shaped SRS0 in the alias's domain, made with the server's secret.
    assert sender.domain == "example.test"
    assert sender.local.startswith("SRS0=") and sender.local.endswith("=elsewhere.test=someone")
    assert net.srs().reverse(sender) == path(f"<{SOMEONE}>")
    # The local copy keeps the original return path.
    (local,) = [p for p in net.srv.messages("bob@example.test") if b"fwd-srs-1" in p.read_bytes()]
    assert local.read_bytes().startswith(b"Return-Path: <someone@elsewhere.test>\n")


def test_null_and_local_senders_are_not_rewritten(net: Net) -> None:
    smtp_send(net, "<>", ["fwd@example.test"], b"Subject: fwd-srs-null\r\n\r\nbounce\r\n")
    smtp_send(
        net, "bob@example.test", ["fwd@example.test"], b"Subject: fwd-srs-local\r\n\r\nhi\r\n"
    )
    assert wait_for(lambda: len(arrived(net.remote, b"fwd-srs-null")) == 1)
    assert arrived(net.remote, b"fwd-srs-null")[0].sender == "<>"
    assert wait_for(lambda: len(arrived(net.remote, b"fwd-srs-local")) == 1)
    assert arrived(net.remote, b"fwd-srs-local")[0].sender == "<bob@example.test>"


def test_downstream_refusal_bounces_only_headers_to_the_original_sender(net: Net) -> None:
    # An attacker forges SOMEONE as the sender and fills the message, header
    # and body, with what it wants delivered to SOMEONE.
    junk = "".join(f"X-Junk-{i}: {'spam ' * 180}\r\n" for i in range(70))  # ~64 KiB
    message = (
        f"From: someone@elsewhere.test\r\nTo: gone@example.test\r\nSubject: fwd-srs-550\r\n"
        f"Message-ID: <fwd-srs-550@elsewhere.test>\r\n{junk}\r\n"
        + "BUY NOW, body text the victim must never see\r\n"
        * 200
    ).encode()
    assert len(message) > 60_000
    smtp_send(net, SOMEONE, ["gone@example.test"], message)
    assert wait_for(lambda: len(arrived(net.origin, b"fwd-srs-550")) == 1, 30), net.srv.log()
    (bounce,) = arrived(net.origin, b"fwd-srs-550")
    assert bounce.sender == "<>"  # RFC 5321 §4.5.5
    assert bounce.recipients == [f"<{SOMEONE}>"]  # un-rewritten from the SRS sender
    dsn = email.message_from_bytes(bounce.data, policy=email.policy.default)
    assert isinstance(dsn, EmailMessage)
    assert dsn.get_content_type() == "multipart/report"
    _text, status, headers = dsn.get_payload()  # type: ignore[misc]
    assert "Final-Recipient: rfc822; refuse@remote.test" in status.as_string()
    assert headers.get_content_type() == "text/rfc822-headers"
    quoted = headers.get_content()
    assert "Subject: fwd-srs-550" in quoted
    assert "Message-ID: <fwd-srs-550@elsewhere.test>" in quoted
    # Only the identifying fields: none of the junk, none of the body.
    assert b"X-Junk" not in bounce.data
    assert b"BUY NOW" not in bounce.data
    assert len(bounce.data) < 8192


def test_a_bounce_to_the_srs_address_reaches_the_original_sender(net: Net) -> None:
    smtp_send(net, SOMEONE, ["fwd@example.test"], b"Subject: fwd-srs-2\r\n\r\nhello\r\n")
    assert wait_for(lambda: len(arrived(net.remote, b"fwd-srs-2")) == 1)
    srs_address = arrived(net.remote, b"fwd-srs-2")[0].sender.strip("<>")
    # remote.test accepted, then bounces later, to the return path it was given.
    smtp_send(
        net,
        "<>",
        [srs_address],
        b"From: MAILER-DAEMON@remote.test\r\nSubject: fwd-srs-2-bounced\r\n\r\nfailed\r\n",
    )
    assert wait_for(lambda: len(arrived(net.origin, b"fwd-srs-2-bounced")) == 1, 30)
    (bounce,) = arrived(net.origin, b"fwd-srs-2-bounced")
    assert bounce.sender == "<>"
    assert bounce.recipients == [f"<{SOMEONE}>"]
    # Case smashed on the way (libsrs2 compares hashes without case): still ours.
    assert rcpt_reply(net, "<>", srs_address.lower())[0] == 250


def test_forged_expired_and_non_bounce_srs_addresses_are_refused(net: Net) -> None:
    good = net.srs().forward(path("<victim@elsewhere.test>"), "example.test")
    assert good is not None
    assert rcpt_reply(net, "<>", str(good))[0] == 250
    tag, hashed, rest = good.local.split("=", 2)
    # SRS hashes compare without case: the forged one must differ in more than case.
    forged = f"{tag}={'A' if hashed[0].upper() != 'A' else 'B'}{hashed[1:]}={rest}@example.test"
    code, text = rcpt_reply(net, "<>", forged)
    assert (code, text[:5]) == (550, b"5.1.1"), text
    # Made with our secret, 30 days ago: past the 21 days bounces are taken.
    month_ago = time.time() - 30 * 86400
    old = Srs(load_secrets(net.srv.data_dir), clock=lambda: month_ago).forward(
        path("<victim@elsewhere.test>"), "example.test"
    )
    assert old is not None
    code, text = rcpt_reply(net, "<>", str(old))
    assert (code, text[:5]) == (550, b"5.1.1"), text
    # Another server's (another secret's) SRS address is not ours either.
    theirs = Srs([b"not-the-server-secret-1"]).forward(path("<v@elsewhere.test>"), "example.test")
    assert rcpt_reply(net, "<>", str(theirs))[0] == 550
    # A valid address takes bounces only (MAIL FROM:<>), not mail to relay.
    code, text = rcpt_reply(net, "spammer@elsewhere.test", str(good))
    assert (code, text[:5]) == (550, b"5.7.1"), text
    assert "srs: refused" in net.srv.log()


def test_a_quoted_dot_atom_sender_is_rewritten_and_bounced_headers_only(net: Net) -> None:
    """review #2: ``"someone"`` is ``someone``: it gets SRS (no forged sender
    downstream) and a refusal there gives the headers-only bounce."""
    junk = "".join(f"X-Junk-{i}: {'spam ' * 180}\r\n" for i in range(10))
    message = f"From: someone@elsewhere.test\r\nSubject: q-srs\r\n{junk}\r\nBUY NOW\r\n".encode()
    smtp_send(net, '<"someone"@elsewhere.test>', ["gone@example.test", "fwd@example.test"], message)
    assert wait_for(lambda: len(arrived(net.remote, b"q-srs")) == 1, 30), net.srv.log()
    sender = path(arrived(net.remote, b"q-srs")[0].sender)
    assert sender.domain == "example.test" and sender.local.startswith("SRS0=")
    assert sender.local.endswith("=elsewhere.test=someone")
    assert wait_for(lambda: len(arrived(net.origin, b"q-srs")) == 1, 30), net.srv.log()
    (bounce,) = arrived(net.origin, b"q-srs")
    assert bounce.sender == "<>" and bounce.recipients == [f"<{SOMEONE}>"]
    assert b"X-Junk" not in bounce.data and b"BUY NOW" not in bounce.data


def test_a_quoted_sender_gets_a_quoted_srs_address_that_takes_its_bounces(net: Net) -> None:
    """A local part that is no dot-atom: the SRS local part is quoted whole,
    valid on the wire, and a bounce to it goes back to the quoted sender."""
    sender = '"x(evil)"@elsewhere.test'
    smtp_send(net, f"<{sender}>", ["fwd@example.test"], b"Subject: q-srs-2\r\n\r\nhello\r\n")
    assert wait_for(lambda: len(arrived(net.remote, b"q-srs-2")) == 1, 30), net.srv.log()
    srs_address = path(arrived(net.remote, b"q-srs-2")[0].sender)
    assert srs_address.domain == "example.test"
    assert srs_address.local.startswith('"SRS0=') and srs_address.local.endswith('=x(evil)"')
    smtp_send(net, "<>", [f"<{srs_address}>"], b"Subject: q-srs-2-bounced\r\n\r\nfailed\r\n")
    assert wait_for(lambda: len(arrived(net.origin, b"q-srs-2-bounced")) == 1, 30)
    (bounce,) = arrived(net.origin, b"q-srs-2-bounced")
    assert bounce.sender == "<>" and bounce.recipients == [f"<{sender}>"]


def srs_for(net: Net, victim: str) -> str:
    good = net.srs().forward(path(f"<{victim}>"), "example.test")
    assert good is not None
    return str(good)


def test_a_bounce_to_an_srs_address_is_capped_at_64_kib(net: Net) -> None:
    """review #6: a valid SRS address relays null-sender mail, so only what a
    bounce needs: over 64 KiB is 552 5.3.4, before the data when SIZE= says
    so, else after it; nothing reaches the original sender."""
    target = srs_for(net, "capped@elsewhere.test")
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.ehlo("bounces.remote.test")
        assert client.mail("<>", ["SIZE=70000"])[0] == 250
        code, text = client.rcpt(target)
        assert (code, text[:5]) == (552, b"5.3.4"), text
        client.rset()
        assert client.mail("<>")[0] == 250  # no SIZE=: found out while reading
        assert client.rcpt(target)[0] == 250
        big = b"Subject: srs-cap-big\r\n\r\n" + b"x" * 76 + b"\r\n"
        code, text = client.data(big * 1000)
        assert (code, text[:5]) == (552, b"5.3.4"), text
        # A bounce of a normal size still goes through.
        assert client.mail("<>", ["SIZE=20000"])[0] == 250
        assert client.rcpt(target)[0] == 250
        code, _ = client.data(b"Subject: srs-cap-small\r\n\r\n" + b"y" * 76 * 200 + b"\r\n")
        assert code == 250
    assert wait_for(lambda: len(arrived(net.origin, b"srs-cap-small")) == 1, 30)
    assert not arrived(net.origin, b"srs-cap-big")


def test_a_bounce_to_an_srs_address_goes_alone(net: Net) -> None:
    """At most one SRS recipient per transaction, and with no one else: its
    size cap can then refuse nobody else's copy.  452 4.5.3: the client
    sends the others in transactions of their own (RFC 5321 §4.5.3.1.10)."""
    first, second = srs_for(net, "one@elsewhere.test"), srs_for(net, "two@elsewhere.test")
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.ehlo("bounces.remote.test")
        assert client.mail("<>")[0] == 250
        assert client.rcpt(first)[0] == 250
        for other in (second, "bob@example.test"):
            code, text = client.rcpt(other)
            assert (code, text[:5]) == (452, b"4.5.3"), text
        client.rset()
        assert client.mail("<>")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.rcpt(first)
        assert (code, text[:5]) == (452, b"4.5.3"), text
