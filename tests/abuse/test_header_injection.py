"""Header and log injection through what the client names: HELO, envelope, AUTH names.

The HELO name, MAIL FROM and RCPT TO end up in the stored message (Received,
Return-Path, Delivered-To) and in the log.  A CR, LF or NUL smuggled into
any of them must never start a new header line or a new log line.  The
check is on bytes: after every attempt no stored line begins with the
injected field name, and every log line is one of ours.
"""

from __future__ import annotations

import base64
import poplib
import smtplib
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, make_server, raw, submission, tls_context, wait_for
from tests.support.logs import LOG_LINE, records
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.abuse

EVIL = b"X-Injected: yes"

# (HELO, MAIL FROM line, RCPT TO line) sent verbatim.
ATTEMPTS = {
    "helo-lf": (b"EHLO x.test\n" + EVIL, b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice@example.test>"),
    "helo-cr": (b"EHLO x.test\r" + EVIL, b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice@example.test>"),
    "helo-nul": (b"EHLO x.test\x00" + EVIL, b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice@example.test>"),
    "mail-lf": (b"EHLO x.test", b"MAIL FROM:<a@remote.test>\n" + EVIL, b"RCPT TO:<alice@example.test>"),
    "mail-cr": (b"EHLO x.test", b"MAIL FROM:<a@remote.test\r" + EVIL + b">", b"RCPT TO:<alice@example.test>"),
    "mail-quoted-lf": (b"EHLO x.test", b'MAIL FROM:<"a\n' + EVIL + b'"@remote.test>', b"RCPT TO:<alice@example.test>"),
    "mail-quoted-cr": (b"EHLO x.test", b'MAIL FROM:<"a\r' + EVIL + b'"@remote.test>', b"RCPT TO:<alice@example.test>"),
    "mail-escaped-cr": (b"EHLO x.test", b'MAIL FROM:<"a\\\r' + EVIL + b'"@remote.test>', b"RCPT TO:<alice@example.test>"),
    "mail-nul": (b"EHLO x.test", b"MAIL FROM:<a\x00" + EVIL + b"@remote.test>", b"RCPT TO:<alice@example.test>"),
    "mail-param-cr": (b"EHLO x.test", b"MAIL FROM:<a@remote.test> BODY=8BITMIME\r" + EVIL, b"RCPT TO:<alice@example.test>"),
    "mail-u2028": (b"EHLO x.test", '<"a\u2028X-Injected: yes"@remote.test> SMTPUTF8'.encode().join([b"MAIL FROM:", b""]), b"RCPT TO:<alice@example.test>"),
    "mail-nel": (b"EHLO x.test", '<a\u0085X-Injected@remote.test> SMTPUTF8'.encode().join([b"MAIL FROM:", b""]), b"RCPT TO:<alice@example.test>"),
    "rcpt-lf": (b"EHLO x.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice@example.test>\n" + EVIL),
    "rcpt-cr": (b"EHLO x.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice+\r" + EVIL + b"@example.test>"),
    "rcpt-quoted-lf": (b"EHLO x.test", b"MAIL FROM:<a@remote.test>", b'RCPT TO:<"alice\n' + EVIL + b'"@example.test>'),
    "rcpt-u2028": (b"EHLO x.test", b"MAIL FROM:<a@remote.test> SMTPUTF8", "RCPT TO:<alice+\u2028X-Injected@example.test>".encode()),
}  # fmt: skip


def assert_no_injected_header(srv: PostofficeServer) -> None:
    for path in srv.messages(ALICE):
        head = path.read_bytes().split(b"\n\n", 1)[0]
        for line in head.split(b"\n"):
            assert not line.lower().startswith(b"x-injected"), (path, head)


def assert_log_lines_are_ours(srv: PostofficeServer) -> None:
    lines = srv.log().splitlines()
    # The start-up banner (listeners, domains; stdout) is one block, and the
    # records logged while the server was built (stderr) may come before it.
    # Everything else is a log record.
    first = next(i for i, line in enumerate(lines) if line.startswith("postoffice "))
    end = first + 1
    while end < len(lines) and (lines[end].startswith("  ") or lines[end].startswith("No users")):
        end += 1
    for line in lines[:first] + lines[end:]:
        assert LOG_LINE.match(line), line
        assert not line.lower().startswith("x-injected")


@pytest.mark.parametrize("helo, mail, rcpt", ATTEMPTS.values(), ids=ATTEMPTS.keys())
def test_envelope_and_helo_cannot_inject_headers(
    server: PostofficeServer, helo: bytes, mail: bytes, rcpt: bytes
) -> None:
    client = raw(server, ehlo=False)
    # Send line by line and read whatever comes back: a command cut in two
    # by a bare LF is two commands with two replies.
    client.send(helo + b"\r\n" + mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
    client.send(b"Subject: injection\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    codes = []
    for _ in range(12):
        try:
            codes.append(client.reply()[0])
        except (ConnectionError, OSError):
            break
        if codes[-1] == 221:
            break
    assert 221 in codes, codes  # the session survived to the end
    assert_no_injected_header(server)
    assert wait_for(lambda: "smtp" in server.log())
    assert_log_lines_are_ours(server)


@pytest.mark.parametrize("port", ["submission", "pop3"])
def test_auth_names_cannot_inject_log_lines(server: PostofficeServer, port: str) -> None:
    forged = (
        "alice@example.test\n2024-01-01T00:00:00.000+00:00 postoffice[1]: INFO postoffice.auth:"
        " auth ok user=admin"
    )
    token = base64.b64encode(f"\0{forged}\0whatever".encode()).decode()
    if port == "submission":
        client = submission(server)
        assert client.cmd(f"AUTH PLAIN {token}")[0] == 503  # already logged in: refused
        fresh = raw(server, "submissions")
        assert fresh.cmd(f"AUTH PLAIN {token}")[0] == 535
    else:
        pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], timeout=15, context=tls_context())
        with pytest.raises(poplib.error_proto):
            pop._shortcmd(f"AUTH PLAIN {token}")
        pop.close()
    assert wait_for(lambda: "auth failed" in server.log())
    assert "user=admin" not in server.log()
    assert_log_lines_are_ours(server)


# --- forged log fields ------------------------------------------------------------
def test_quoted_local_parts_cannot_forge_log_fields(server: PostofficeServer) -> None:
    sender = '"x client=evil user=root"@example.test'
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo('client"x=y')  # one token: a HELO name may hold '"' and '='
        s.sendmail(sender, [ALICE], b"Subject: fields\r\n\r\nbody\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail(sender, ['"y client=evil"@elsewhere.test'], b"Subject: no\r\n\r\n.\r\n")

    def ours(start: str) -> list[dict[str, str]]:  # the module's server has other records too
        return [r for r in records(server, start) if r.get("helo") == 'client"x=y']

    assert wait_for(lambda: len(ours("received id=")) == 1 and len(ours("smtp reject")) == 1)
    assert_log_lines_are_ours(server)
    (accepted,) = ours("received id=")
    assert accepted["client"] == "127.0.0.1"
    assert accepted["from"] == f"<{sender}>"
    assert accepted["to"] == f"<{ALICE}>"
    assert accepted["user"] == "-" and accepted["mode"] == "smtp"
    (refused,) = ours("smtp reject")
    assert refused["client"] == "127.0.0.1" and refused["from"] == f"<{sender}>"
    assert refused["to"] == '<"y client=evil"@elsewhere.test>'


def test_auth_names_with_line_breaks_cannot_forge_log_fields(tmp_path: Path) -> None:
    names = ["a client=evil", "a\r\nclient=evil", "a\nuser=admin", "a\0client=evil", 'a" x="y']
    srv = make_server(tmp_path, auth={"throttle_after": 20})  # no waits between the tries
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=15) as s:
            s.starttls(context=tls_context())
            s.ehlo()
            codes = []
            for name in names:
                s.user, s.password = name, "wrong-password"
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    s.auth("PLAIN", s.auth_plain)
                codes.append(refused.value.smtp_code)
        # A NUL in the name is a malformed PLAIN message (RFC 4616 §2): 501, no try.
        assert codes == [535, 535, 535, 501, 535], codes
        assert wait_for(lambda: len(records(srv, "auth failed")) == 4, 15)
        assert_log_lines_are_ours(srv)
        failed = records(srv, "auth failed")
    finally:
        srv.stop()
    for record in failed:
        assert record["client"] == "127.0.0.1" and record["protocol"] == "smtp"
        assert record["user"] == "-"  # not an account name: never logged as given
