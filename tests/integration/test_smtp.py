"""Inbound SMTP (RFC 5321) against the real server over real sockets."""

from __future__ import annotations

import os
import smtplib
import ssl
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

MESSAGE = (
    b"From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nHello Alice.\r\n"
)


def smtp(server: PostofficeServer) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10)


def raw(server: PostofficeServer, ehlo: bool = True) -> RawSmtp:
    client = RawSmtp("127.0.0.1", server.ports["smtp"])
    code, _ = client.reply()
    assert code == 220
    if ehlo:
        assert client.cmd("EHLO client.test")[0] == 250
    return client


def test_delivers_to_local_mailbox_with_trace_headers(server: PostofficeServer) -> None:
    with smtp(server) as client:
        client.ehlo("client.test")
        refused = client.sendmail("sender@remote.test", ["alice@example.test"], MESSAGE)
        assert refused == {}
    files = server.messages("alice@example.test")
    assert len(files) == 1
    path = files[0]
    assert path.parent.name == "new"
    content = path.read_bytes()
    assert b"\r\n" not in content  # stored with LF line endings like other Maildir writers
    assert content.startswith(
        b"Return-Path: <sender@remote.test>\nDelivered-To: alice@example.test\n"
    )
    assert b"Received: from client.test ([127.0.0.1])" in content
    assert b"by mail.example.test (postoffice) with ESMTP id " in content
    assert b"for <alice@example.test>;" in content
    assert content.endswith(b"Subject: hi\n\nHello Alice.\n")
    name = path.name
    assert f",S={len(content)}," in name
    crlf_size = len(content) + content.count(b"\n")
    assert f",W={crlf_size}" in name
    assert not list((server.maildir("alice@example.test") / "tmp").iterdir())


def test_ehlo_advertises_extensions(server: PostofficeServer) -> None:
    with smtp(server) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        for ext in (
            "pipelining",
            "size",
            "8bitmime",
            "smtputf8",
            "enhancedstatuscodes",
            "starttls",
        ):
            assert client.has_extn(ext), ext
        assert client.esmtp_features["size"] == str(25 * 1024 * 1024)
        assert not client.has_extn("auth")  # no AUTH on the MTA port
        assert client.helo("client.test")[0] == 250


def test_simple_commands(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("NOOP")[0] == 250
    assert client.cmd("VRFY alice")[0] == 252
    assert client.cmd("HELP")[0] == 214
    assert client.cmd("RSET")[0] == 250
    assert client.cmd("FOO bar")[0] == 500
    assert client.cmd("QUIT")[0] == 221
    assert client.closed_by_peer()


def test_unknown_local_user_is_550_511(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    code, lines = client.cmd("RCPT TO:<nobody@example.test>")
    assert code == 550 and lines[0].startswith("5.1.1")


@pytest.mark.abuse
@pytest.mark.parametrize(
    "rcpt",
    [
        "<victim@elsewhere.test>",
        "<victim%elsewhere.test@example.test>",
        "<elsewhere.test!victim@example.test>",
        '<"victim@elsewhere.test"@example.test>',
        "<@example.test:victim@elsewhere.test>",
        "<victim@[192.0.2.1]>",
        "<alice@example.test.elsewhere.test>",
    ],
)
def test_no_open_relay(server: PostofficeServer, rcpt: str) -> None:
    client = raw(server)
    assert client.cmd("MAIL FROM:<spammer@remote.test>")[0] == 250
    code, lines = client.cmd(f"RCPT TO:{rcpt}")
    assert code in (550, 554), (rcpt, code, lines)
    assert lines[0][:1] == "5"
    code, _ = client.cmd("DATA")
    assert code in (503, 554)


def test_source_route_to_local_user_is_accepted_and_ignored(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert client.cmd("RCPT TO:<@relay.test,@other.test:alice@example.test>")[0] == 250


def test_sequence_errors(server: PostofficeServer) -> None:
    client = raw(server, ehlo=False)
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 503  # no EHLO yet
    assert client.cmd("EHLO client.test")[0] == 250
    assert client.cmd("RCPT TO:<alice@example.test>")[0] == 503
    assert client.cmd("DATA")[0] == 503
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 503
    assert client.cmd("DATA")[0] in (503, 554)


def test_pipelining_in_one_write(server: PostofficeServer) -> None:
    client = raw(server)
    client.send(
        b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    assert [client.reply()[0] for _ in range(5)] == [250, 250, 550, 250, 354]
    client.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nMAIL FROM:<q@remote.test>\r\nQUIT\r\n")
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 221]
    assert len(server.messages("alice@example.test")) == 1
    assert len(server.messages("bob@example.test")) == 1


def test_multiple_recipients_stored_once_and_linked(server: PostofficeServer) -> None:
    with smtp(server) as client:
        client.sendmail("s@remote.test", ["alice@example.test", "bob@example.test"], MESSAGE)
    (a,) = server.messages("alice@example.test")
    (b,) = server.messages("bob@example.test")
    assert a.read_bytes() == b.read_bytes()
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert b"Delivered-To:" not in a.read_bytes()  # would disclose the other recipient


def test_declared_size_over_limit_is_552(server: PostofficeServer) -> None:
    client = raw(server)
    code, lines = client.cmd(f"MAIL FROM:<a@remote.test> SIZE={26 * 1024 * 1024}")
    assert code == 552 and lines[0].startswith("5.3.4")
    # More digits than RFC 1870's 20 is still a size, and too big (not 501).
    code, lines = client.cmd("MAIL FROM:<a@remote.test> SIZE=" + "9" * 24)
    assert code == 552 and lines[0].startswith("5.3.4")


def test_unknown_mail_parameter_is_555(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("MAIL FROM:<a@remote.test> FROBNICATE=1")[0] == 555


def test_command_line_over_512_octets(server: PostofficeServer) -> None:
    client = raw(server)
    code, _ = client.cmd("NOOP " + "x" * 600)
    assert code == 500
    assert client.cmd("NOOP")[0] == 250  # the session goes on


def test_lines_over_998_octets_are_stored_byte_identical(server: PostofficeServer) -> None:
    """Postfix keeps such lines whole; so do we (RFC 5322 §2.1.1 asks senders, not us)."""
    body_line = bytes(range(33, 127)) * 26 + b"x" * 56  # 2,500 octets
    header_line = b"X-Long: " + b"h" * 1500
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd("RCPT TO:<alice@example.test>")
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: long\r\n" + header_line + b"\r\n\r\n" + body_line + b"\r\n.\r\n")
    code, lines = client.reply()
    assert code == 250, lines
    (path,) = server.messages("alice@example.test")
    content = path.read_bytes()
    assert content.endswith(b"Subject: long\n" + header_line + b"\n\n" + body_line + b"\n")


def test_a_line_over_max_line_length_is_refused_after_the_data(server: PostofficeServer) -> None:
    """The default bound, 64 KiB: the decoder streams such a line (it is never
    held), the message is refused after the final dot and the session goes on."""
    client = raw(server)
    for length, expected in ((65536, 250), (65537, 554)):
        client.cmd("MAIL FROM:<a@remote.test>")
        client.cmd("RCPT TO:<alice@example.test>")
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: huge\r\n\r\n" + b"y" * length + b"\r\n.\r\n")
        code, lines = client.reply()
        assert code == expected, lines
    assert lines[0] == "5.6.0 Message has a line longer than 65536 octets"
    assert len(server.messages("alice@example.test")) == 1
    assert client.cmd("NOOP")[0] == 250


@pytest.mark.abuse
@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r"],
)
def test_smtp_smuggling_is_not_a_second_message(server: PostofficeServer, fake_end: bytes) -> None:
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd("RCPT TO:<alice@example.test>")
    assert client.cmd("DATA")[0] == 354
    smuggled = (
        b"Subject: outer\r\n\r\nouter body"
        + fake_end
        + b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    client.send(smuggled)
    code, _ = client.reply()
    # One reply for the whole thing: accepted as one message (bare LF normalised)
    # or refused (bare CR); never a second transaction.
    assert code in (250, 554)
    assert client.cmd("NOOP")[0] == 250
    assert server.messages("bob@example.test") == []
    stored = server.messages("alice@example.test")
    assert len(stored) <= 1
    if stored:
        assert b"Subject: smuggled" in stored[0].read_bytes()  # it is only content


def test_bare_lf_lines_are_normalised(server: PostofficeServer) -> None:
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd("RCPT TO:<alice@example.test>")
    client.cmd("DATA")
    client.send(b"Subject: lf\n\nline one\nline two\r\n.\r\n")
    assert client.reply()[0] == 250
    (path,) = server.messages("alice@example.test")
    assert path.read_bytes().endswith(b"Subject: lf\n\nline one\nline two\n")


def test_dot_stuffing_is_removed(server: PostofficeServer) -> None:
    with smtp(server) as client:
        client.sendmail(
            "a@remote.test",
            ["alice@example.test"],
            b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n",
        )
    # smtplib stuffs the leading dots; the stored message has the original text
    (path,) = server.messages("alice@example.test")
    assert path.read_bytes().endswith(b"\n\n.leading dot\n..two dots\n.\n")


def test_starttls_then_delivery(server: PostofficeServer) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtp(server) as client:
        client.ehlo("client.test")
        assert client.starttls(context=ctx)[0] == 220
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        client.sendmail("a@remote.test", ["alice@example.test"], MESSAGE)
    (path,) = server.messages("alice@example.test")
    assert b"with ESMTPS id" in path.read_bytes()
    assert b"(using TLSv1." in path.read_bytes()


@pytest.mark.abuse
def test_starttls_command_injection_is_refused(server: PostofficeServer) -> None:
    """RFC 3207 §4.2: commands pipelined behind STARTTLS are never executed;
    the STARTTLS is refused and the session closed, as POP3 does for STLS."""
    client = raw(server)
    client.send(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    code, lines = client.reply()
    assert (code, lines[0]) == (554, "5.5.1 Nothing may follow STARTTLS before the handshake")
    assert client.closed_by_peer()
    client.close()
    assert "evil@remote.test" not in server.log()


def test_rset_clears_the_transaction(server: PostofficeServer) -> None:
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd("RCPT TO:<alice@example.test>")
    assert client.cmd("RSET")[0] == 250
    assert client.cmd("DATA")[0] == 503


def test_plus_addressing_alias_and_catch_all(server: PostofficeServer) -> None:
    server.cli("alias", "add", "team@example.test", "alice@example.test", "bob@example.test")
    server.cli("alias", "add", "@example.test", "bob@example.test")
    with smtp(server) as client:
        client.sendmail("a@remote.test", ["alice+news@example.test"], MESSAGE)
        client.sendmail("a@remote.test", ["team@example.test"], MESSAGE)
        client.sendmail("a@remote.test", ["whoever@example.test"], MESSAGE)
    assert len(server.messages("alice@example.test")) == 2
    assert len(server.messages("bob@example.test")) == 2


def test_account_changes_apply_without_restart(server: PostofficeServer) -> None:
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    assert client.cmd("RCPT TO:<carol@example.test>")[0] == 550
    server.add_user("carol@example.test", "carol-password-3")
    assert client.cmd("RCPT TO:<carol@example.test>")[0] == 250
    server.cli("domain", "add", "other.test")
    server.add_user("dave@other.test", "dave-password-4")
    assert client.cmd("RCPT TO:<dave@other.test>")[0] == 250


def test_sigterm_exits_zero(server: PostofficeServer) -> None:
    assert server.stop() == 0
    assert "stopped" in server.log()


def test_transaction_is_logged(server: PostofficeServer) -> None:
    with smtp(server) as client:
        client.sendmail("a@remote.test", ["alice@example.test"], MESSAGE)
    assert wait_for(lambda: "result=250" in server.log())
    line = next(line for line in server.log().splitlines() if "result=250" in line)
    assert "client=127.0.0.1" in line and "from=<a@remote.test>" in line
    assert "to=<alice@example.test>" in line and "size=" in line and "id=" in line


def test_utf8_address_with_smtputf8(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("MAIL FROM:<jörg@bücher.test> SMTPUTF8".encode())[0] == 250
    assert client.cmd("RCPT TO:<alice@example.test>")[0] == 250
    client2 = raw(server)
    assert client2.cmd("MAIL FROM:<jörg@bücher.test>".encode())[0] in (501, 553)  # needs SMTPUTF8


def _limited(tmp_path: Path, **limits: object) -> PostofficeServer:
    srv = PostofficeServer(tmp_path, sections={"limits": limits})
    srv.add_user("alice@example.test", "alice-password-1")
    srv.start()
    return srv


def test_limits_message_size_recipients_and_timeout(tmp_path: Path) -> None:
    srv = _limited(tmp_path, max_message_size=2000, max_recipients=2, smtp_timeout=1.0)
    try:
        client = raw(srv)
        client.cmd("MAIL FROM:<a@remote.test>")
        assert client.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert client.cmd("RCPT TO:<alice+2@example.test>")[0] == 250
        code, lines = client.cmd("RCPT TO:<alice+3@example.test>")
        assert code == 452 and lines[0].startswith("4.5.3")
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: big\r\n\r\n" + (b"z" * 70 + b"\r\n") * 100 + b".\r\n")
        code, lines = client.reply()
        assert code == 552 and lines[0].startswith("5.3.4")
        assert srv.messages("alice@example.test") == []
        # idle past smtp_timeout: 421 and the connection closes
        code, lines = client.reply()
        assert code == 421 and lines[0].startswith("4.4.2")
        assert client.closed_by_peer()
    finally:
        srv.stop()


def test_connection_caps_per_ip(tmp_path: Path) -> None:
    srv = _limited(tmp_path, max_connections_per_ip=2)
    try:
        first, second = raw(srv, ehlo=False), raw(srv, ehlo=False)
        third = RawSmtp("127.0.0.1", srv.ports["smtp"])
        code, _ = third.reply()
        assert code == 421
        assert third.closed_by_peer()
        # another loopback address is another client
        other = RawSmtp("127.0.0.1", srv.ports["smtp"], source="127.0.0.2")
        assert other.reply()[0] == 220
        for c in (first, second, other):
            c.close()
    finally:
        srv.stop()


def test_too_many_errors_closes_the_session(tmp_path: Path) -> None:
    srv = _limited(tmp_path, max_errors=3)
    try:
        client = raw(srv)
        codes = [client.cmd("BOGUS")[0] for _ in range(3)]
        assert codes == [500, 500, 500]
        code, _ = client.reply()  # at once after the third (tests/abuse/test_error_limits.py)
        assert code == 421
    finally:
        srv.stop()


@pytest.mark.interop
def test_swaks_delivers(server: PostofficeServer, require_program) -> None:  # type: ignore[no-untyped-def]
    swaks = require_program("swaks")
    import subprocess

    result = subprocess.run(
        [
            swaks,
            "--server",
            "127.0.0.1",
            "--port",
            str(server.ports["smtp"]),
            "--from",
            "someone@remote.test",
            "--to",
            "alice@example.test",
            "--header",
            "Subject: via swaks",
            "--body",
            "swaks body",
            "-tls",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = server.messages("alice@example.test")
    assert b"Subject: via swaks" in path.read_bytes()


@pytest.mark.abuse
def test_mail_loop_is_refused_after_100_hops(server: PostofficeServer) -> None:
    hops = b"".join(
        b"Received: from hop%d.test by hop%d.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i + 1)
        for i in range(100)
    )
    with smtp(server) as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(
            "a@remote.test", ["alice@example.test"], hops + b"Subject: loop\r\n\r\nx\r\n"
        )
    assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.4.6")
    with smtp(server) as client:  # 99 relays before us are fine
        client.sendmail(
            "a@remote.test",
            ["alice@example.test"],
            hops[hops.index(b"Received", 10) :] + b"\r\nx\r\n",
        )
    assert len(server.messages("alice@example.test")) == 1


def test_replies_are_ascii(server: PostofficeServer) -> None:
    """RFC 5321 §2.4: the refusals that cite an RFC section do it in ASCII."""
    client = raw(server)
    hops = b"".join(
        b"Received: from h%d.test by h.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
        for i in range(100)
    )
    for content in (b"Subject: cr\r\n\r\nbare\rCR\r\n", hops + b"Subject: loop\r\n\r\nx\r\n"):
        assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
        assert client.cmd("RCPT TO:<alice@example.test>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(content + b".\r\n")
        while b"\r\n" not in client.buf:
            client.buf += client.sock.recv(4096)
        line = client.buf.split(b"\r\n", 1)[0]
        assert line[:3] == b"554" and b"section" in line and line.isascii(), line
        client.reply()
    client.close()


def test_helo_with_parentheses_keeps_received_well_formed(server: PostofficeServer) -> None:
    """Any HELO name is taken (as Postfix does by default); in Received: its
    specials become "?" so the trace comment structure holds (RFC 5321 §4.4)."""
    with smtp(server) as client:
        client.ehlo("a)b(c")
        client.sendmail("a@remote.test", ["alice@example.test"], b"Subject: helo\r\n\r\nx\r\n")
    (path,) = server.messages("alice@example.test")
    received = path.read_bytes().split(b"\nReceived: ", 1)[1].split(b"\n")[0]
    assert received == b"from a?b?c ([127.0.0.1])"
