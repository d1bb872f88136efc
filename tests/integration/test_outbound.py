"""Outbound mail end to end: the real server, a real DNS server, real receiving MTAs.

The server (``python -m postoffice serve``) resolves MX records through
dnsmasq on a loopback port (``[relay] dns_servers``) and delivers to
Postfix's smtp-sink on 127.0.0.2/127.0.0.3/127.0.0.4 (``[relay] mx_port``).
Mail is submitted the way a user does: submission port, STARTTLS, AUTH.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq, SmtpSink
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

MX1, MX2, IMPLICIT = "127.0.0.2", "127.0.0.3", "127.0.0.4"
ALICE = "alice@example.test"


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path_factory.mktemp("dns"),
        mx=[("remote.test", "mx1.remote.test", 10), ("remote.test", "mx2.remote.test", 20)],
        hosts={"mx1.remote.test": [MX1], "mx2.remote.test": [MX2], "implicit.test": [IMPLICIT]},
        null_mx=["nullmx.test"],
    ).start()
    yield server
    server.stop()


@pytest.fixture
def port() -> int:
    return free_port((MX1, MX2, IMPLICIT))


def make_server(tmp_path: Path, dns: Dnsmasq, port: int, **relay: Any) -> PostofficeServer:
    settings = {
        "mx_port": port,
        "dns_servers": [dns.server],
        "retry_schedule": [1],
        "connect_timeout": 5,
        **relay,
    }
    srv = PostofficeServer(tmp_path, sections={"relay": settings})
    srv.add_user(ALICE, "alice-password-1")
    srv.add_user("bob@example.test", "bob-password-2")
    return srv


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[list[SmtpSink]]:
    started: list[SmtpSink] = []
    yield started
    for sink in started:
        sink.stop()


def sink(
    sinks: list[SmtpSink], tmp_path: Path, host: str, port: int, *options: str, name: str = ""
) -> SmtpSink:
    s = SmtpSink(tmp_path, host, port, *options, name=name).start()
    sinks.append(s)
    return s


def submit(
    srv: PostofficeServer,
    rcpts: list[str],
    subject: str = "hello",
    body: str = "Hi there.\r\n.a line with a dot\r\n",
) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15) as client:
        client.starttls(context=ctx)
        client.login(ALICE, "alice-password-1")
        msg = f"From: Alice <{ALICE}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n{body}"
        client.sendmail(ALICE, rcpts, msg.encode())


def queue_files(srv: PostofficeServer) -> list[str]:
    qdir = srv.data_dir / "queue"
    return sorted(p.name for p in qdir.iterdir() if p.name != "tmp") if qdir.is_dir() else []


def dsn_for(srv: PostofficeServer, subject_word: str) -> list[EmailMessage]:
    found = []
    for path in srv.messages(ALICE):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        if subject_word in str(msg["Subject"]):
            found.append(msg)
    return found


def report_fields(dsn: EmailMessage) -> list[dict[str, str]]:
    _text, status, _headers = dsn.get_payload()  # type: ignore[misc]
    return [{k.lower(): str(v) for k, v in block.items()} for block in status.get_payload()]


def test_submitted_mail_goes_to_the_best_mx_in_one_transaction(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    mx1 = sink(sinks, tmp_path, MX1, port)
    mx2 = sink(sinks, tmp_path, MX2, port)
    srv = make_server(tmp_path, dns, port)
    srv.start()
    try:
        submit(srv, ["bob@remote.test", "carol@remote.test"])
        assert wait_for(lambda: len(mx1.messages()) == 1)
        dump = mx1.messages()[0]
        assert dump.count(b"X-Rcpt-Args:") == 2
        assert b"X-Mail-Args: <alice@example.test>" in dump
        assert b"X-Helo-Args: mail.example.test" in dump
        assert b"\n.a line with a dot\n" in dump  # dot-stuffing undone by the peer
        assert b"Subject: hello" in dump
        assert mx2.messages() == []
        assert wait_for(lambda: queue_files(srv) == [])  # delivered, nothing left
        assert "0 message(s) in the queue" in srv.cli("queue", "list").stdout
        log = srv.log()
        assert re.search(
            r"to=<bob@remote\.test> relay=mx1\.remote\.test\[127\.0\.0\.2\]:\d+ "
            r"delay=\S+ tries=1 result=delivered",
            log,
        ), log
    finally:
        srv.stop()


def test_falls_back_to_the_next_mx(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    mx2 = sink(sinks, tmp_path, MX2, port)  # mx1 refuses connections
    srv = make_server(tmp_path, dns, port)
    srv.start()
    try:
        submit(srv, ["bob@remote.test"])
        assert wait_for(lambda: len(mx2.messages()) == 1)
    finally:
        srv.stop()


def test_implicit_mx_and_null_mx(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    a_host = sink(sinks, tmp_path, IMPLICIT, port)
    srv = make_server(tmp_path, dns, port)
    srv.start()
    try:
        submit(srv, ["dave@implicit.test", "erin@nullmx.test"], subject="two ways")
        assert wait_for(lambda: len(a_host.messages()) == 1)
        assert b"X-Rcpt-Args: <dave@implicit.test>" in a_host.messages()[0]
        assert wait_for(lambda: len(dsn_for(srv, "Undelivered")) == 1)
        (dsn,) = dsn_for(srv, "Undelivered")
        _per_message, rcpt = report_fields(dsn)
        assert rcpt["final-recipient"] == "rfc822; erin@nullmx.test"
        assert rcpt["status"] == "5.1.10"
    finally:
        srv.stop()


def test_5xx_bounces_with_a_dsn_in_the_senders_mailbox(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    sink(sinks, tmp_path, MX1, port, "-f", "RCPT")
    srv = make_server(tmp_path, dns, port)
    srv.start()
    try:
        submit(srv, ["bob@remote.test"], subject="lunch on friday?")
        assert wait_for(lambda: len(dsn_for(srv, "Undelivered")) == 1)
        (path,) = srv.messages(ALICE)
        raw = path.read_bytes()
        assert raw.startswith(b"Return-Path: <>\n")  # from the null sender
        (dsn,) = dsn_for(srv, "Undelivered")
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        per_message, rcpt = report_fields(dsn)
        assert per_message["reporting-mta"] == "dns; mail.example.test"
        assert rcpt["final-recipient"] == "rfc822; bob@remote.test"
        assert rcpt["action"] == "failed"
        assert rcpt["status"].startswith("5.")
        assert rcpt["remote-mta"] == "dns; mx1.remote.test"
        assert rcpt["diagnostic-code"].startswith("smtp; 5")
        headers = dsn.get_payload()[2]  # type: ignore[index]
        assert headers.get_content_type() == "text/rfc822-headers"
        assert "Subject: lunch on friday?" in headers.get_content()
        assert wait_for(lambda: queue_files(srv) == [])
    finally:
        srv.stop()


def test_4xx_then_success_on_retry(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    greylist = sink(sinks, tmp_path, MX1, port, "-r", "RCPT", name="grey")
    srv = make_server(tmp_path, dns, port)
    srv.start()
    try:
        submit(srv, ["bob@remote.test"])
        assert wait_for(lambda: "result=deferred" in srv.log())
        listing = srv.cli("queue", "list").stdout
        assert "deferred  <bob@remote.test>" in listing and "450" in listing
        greylist.stop()
        accepting = sink(sinks, tmp_path, MX1, port, name="ok")
        assert wait_for(lambda: len(accepting.messages()) == 1)
        assert wait_for(lambda: queue_files(srv) == [])
        assert re.search(r"to=<bob@remote\.test> .* tries=\d+ result=delivered", srv.log())
        assert dsn_for(srv, "Undelivered") == []
    finally:
        srv.stop()


def test_delay_warning_then_expiry_bounce(tmp_path: Path, dns: Dnsmasq, port: int) -> None:
    srv = make_server(tmp_path, dns, port, warn_after=1, give_up_after=4)
    srv.start()
    try:
        submit(srv, ["bob@remote.test"], subject="patience")
        assert wait_for(lambda: len(dsn_for(srv, "Delayed")) == 1)
        assert wait_for(lambda: len(dsn_for(srv, "Undelivered")) == 1)
        (_m, delayed) = report_fields(dsn_for(srv, "Delayed")[0])
        assert delayed["action"] == "delayed" and delayed["status"].startswith("4.")
        (_m, failed) = report_fields(dsn_for(srv, "Undelivered")[0])
        assert failed["action"] == "failed" and failed["status"] == "5.4.7"
        assert (
            "Connection refused" in failed["diagnostic-code"]
            or "connect" in failed["diagnostic-code"]
        )
        assert wait_for(lambda: queue_files(srv) == [])
        assert len(dsn_for(srv, "Delayed")) == 1  # warned once
    finally:
        srv.stop()


@pytest.mark.faults
def test_queue_survives_kill_9_mid_delivery(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    # The first MX takes MAIL and RCPT, then sits on DATA: every delivery is
    # in flight when the server is killed.
    stuck = sink(sinks, tmp_path, MX1, port, "-w", "60", name="stuck")
    srv = make_server(tmp_path, dns, port, max_per_destination=20)
    srv.start()
    count = 8
    try:
        for i in range(count):
            submit(srv, [f"user{i}@remote.test"], subject=f"tag-{i}")
        assert wait_for(lambda: len(list(stuck.dump.iterdir())) == count)
        srv.kill()
    finally:
        srv.stop()
    stuck.stop()
    assert len([f for f in queue_files(srv) if f.endswith(".msg")]) == count
    good = sink(sinks, tmp_path, MX1, port, name="good")
    srv.start()
    try:
        assert wait_for(lambda: len(good.messages()) == count)
        assert wait_for(lambda: queue_files(srv) == [])
        tags = sorted(
            re.search(rb"Subject: (tag-\d+)", m).group(1)  # type: ignore[union-attr]
            for m in good.messages()
        )
        assert tags == sorted(f"tag-{i}".encode() for i in range(count))  # each exactly once
    finally:
        srv.stop()


def test_queue_list_remove_and_flush_while_serving(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    srv = make_server(tmp_path, dns, port, retry_schedule=[3600])
    srv.start()
    try:
        submit(srv, ["keep@remote.test"], subject="keep me")
        submit(srv, ["drop@remote.test"], subject="drop me")
        assert wait_for(lambda: srv.log().count("result=deferred") == 2)
        listing = srv.cli("queue", "list").stdout
        assert "2 message(s) in the queue" in listing
        ids = re.findall(r"^(\S+)  .*from <alice@example.test>$", listing, re.M)
        assert len(ids) == 2
        drop_id = next(
            i for i in ids if re.search(rf"{i}.*\n\s+deferred\s+<drop@remote.test>", listing)
        )
        assert "removed" in srv.cli("queue", "remove", drop_id).stdout
        assert srv.cli("queue", "remove", drop_id, check=False).returncode == 1
        assert "1 message(s) in the queue" in srv.cli("queue", "list").stdout
        mx1 = sink(sinks, tmp_path, MX1, port)
        assert "running server" in srv.cli("queue", "flush").stdout
        assert wait_for(lambda: len(mx1.messages()) == 1)
        assert b"X-Rcpt-Args: <keep@remote.test>" in mx1.messages()[0]
        assert wait_for(lambda: queue_files(srv) == [])
        assert dsn_for(srv, "Undelivered") == []  # a removed message is not bounced
    finally:
        srv.stop()


def test_alias_to_remote_forwards_through_the_queue_and_bounces_are_not_bounced(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    mx1 = sink(sinks, tmp_path, MX1, port)
    srv = make_server(tmp_path, dns, port)
    srv.cli("alias", "add", "team@example.test", "bob@example.test", "carol@remote.test")
    srv.cli("alias", "add", "void@example.test", "nobody@nullmx.test")
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as client:
            client.sendmail(
                "someone@elsewhere.test",
                ["team@example.test"],
                b"From: someone@elsewhere.test\r\nSubject: to the team\r\n\r\nhi\r\n",
            )
            # A bounce (null sender) to an address that fails: dropped, never bounced.
            client.sendmail(
                "<>",
                ["void@example.test"],
                b"From: MAILER-DAEMON@elsewhere.test\r\nSubject: bounce\r\n\r\nx\r\n",
            )
        assert wait_for(lambda: len(mx1.messages()) == 1)
        assert b"X-Rcpt-Args: <carol@remote.test>" in mx1.messages()[0]
        # Forwarded off-site with an SRS sender of ours (policy/srs.py), so
        # SPF passes downstream and bounces come back through us.
        assert re.search(
            rb"X-Mail-Args: <SRS0=\S{6}=[A-Z2-7]{2}=elsewhere\.test=someone@example\.test>",
            mx1.messages()[0],
        ), mx1.messages()[0]
        assert len(srv.messages("bob@example.test")) == 1
        # The mail log's bounce record: none sent for a null sender (maillog.py).
        assert wait_for(lambda: "sender=<> kind=failed notice=none" in srv.log())
        assert wait_for(lambda: queue_files(srv) == [])
        assert len(mx1.messages()) == 1  # no DSN went anywhere
    finally:
        srv.stop()


def test_long_lines_go_out_folded_and_stay_whole_locally(
    tmp_path: Path, dns: Dnsmasq, port: int, sinks: list[SmtpSink]
) -> None:
    """#11 item 2: a 2,500-octet line, forwarded off-site by an alias, reaches the
    peer folded as Postfix's smtp_line_length_limit folds it (CRLF SPACE after
    998 octets); the local recipient's copy keeps the line as it came."""
    mx1 = sink(sinks, tmp_path, MX1, port)
    srv = make_server(tmp_path, dns, port)
    srv.cli("alias", "add", "team@example.test", "bob@example.test", "carol@remote.test")
    srv.start()
    line = bytes(range(33, 127)) * 26 + b"x" * 56
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as client:
            client.sendmail(
                "app@elsewhere.test",
                ["team@example.test"],
                b"From: app@elsewhere.test\r\nSubject: report\r\n\r\n.x\r\n" + line + b"\r\n",
            )
        assert wait_for(lambda: len(mx1.messages()) == 1)
        dump = mx1.messages()[0]
        folded = line[:998] + b"\n " + line[998:1995] + b"\n " + line[1995:]
        assert b"\n.x\n" + folded + b"\n" in dump
        assert max(len(row) for row in dump.split(b"\n")) <= 998
        (local,) = srv.messages("bob@example.test")
        assert local.read_bytes().endswith(b"Subject: report\n\n.x\n" + line + b"\n")
    finally:
        srv.stop()


def test_relay_to_a_second_postoffice_over_starttls(
    tmp_path: Path, dns: Dnsmasq, sinks: list[SmtpSink]
) -> None:
    # mx1.remote.test (127.0.0.2) is another postoffice, which offers STARTTLS.
    other = PostofficeServer(
        tmp_path / "mx1", domains=("remote.test",), hostname="mx1.remote.test", host=MX1
    )
    other.add_user("bob@remote.test", "bob-password-3")
    other.start()
    try:
        srv = make_server(tmp_path / "a", dns, other.ports["smtp"])
        srv.start()
        try:
            submit(
                srv, ["bob@remote.test"], subject="over tls", body="caf\u00e9 is fine\r\n.dot\r\n"
            )
            assert wait_for(lambda: len(other.messages("bob@remote.test")) == 1)
            content = other.messages("bob@remote.test")[0].read_bytes()
            assert b"from mail.example.test" in content
            assert b"with ESMTPS" in content  # the hop was encrypted (RFC 3848)
            assert "caf\u00e9 is fine\n.dot\n".encode() in content
            assert wait_for(lambda: queue_files(srv) == [])
            assert "(TLS TLSv1." in srv.log()
        finally:
            srv.stop()
    finally:
        other.stop()
