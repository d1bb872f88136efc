"""Sieve at delivery, end to end: the real server, smtplib, dnsmasq and peer MTAs.

Scripts are stored with ``postoffice sieve put`` while the server runs;
then real SMTP deliveries show fileinto (into an IMAP folder, flags in the
``:2,`` part), redirect (out through the queue with an SRS sender), vacation
(one reply per sender within :days, from the null sender, auto-replied) and
no vacation loop between two local users who both have vacation on.  A
broken or failing script delivers to INBOX.  A reject after the SMTP
transaction goes back as a DSN (RFC 5429 §2.1.2), never to the null sender
nor to automatic mail; ``envelope`` sees the RCPT TO address as given
(subaddress, alias); ``body`` tests :raw, :content and :text, within
BODY_LIMIT.
"""

from __future__ import annotations

import email
import email.message
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.peers import Dnsmasq, Received, ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

REMOTE_MX, SENDER_MX = "127.0.0.2", "127.0.0.3"
SOMEONE = "someone@elsewhere.test"


@dataclass
class Net:
    srv: PostofficeServer
    remote: ScriptedMta
    origin: ScriptedMta
    root: Path

    def put(self, address: str, script: str, name: str = "rules") -> None:
        path = self.root / f"{name}.sieve"
        path.write_text(script)
        self.srv.cli("sieve", "put", address, str(path), "--name", name, "--activate")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("sieve")
    dns = Dnsmasq(
        root,
        mx=[("remote.test", "mx.remote.test", 10), ("elsewhere.test", "mx.elsewhere.test", 10)],
        hosts={"mx.remote.test": [REMOTE_MX], "mx.elsewhere.test": [SENDER_MX]},
    ).start()
    port = free_port((REMOTE_MX, SENDER_MX))
    remote = ScriptedMta(REMOTE_MX, port).start()
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
    for user in ("bob", "carol", "dave", "erin", "frank", "gina", "hank"):
        srv.add_user(f"{user}@example.test", f"{user}-password-2")
    srv.cli("alias", "add", "team@example.test", "gina@example.test")
    srv.start()
    try:
        yield Net(srv, remote, origin, root)
    finally:
        srv.stop()
        remote.stop()
        origin.stop()
        dns.stop()


def send(net: Net, sender: str, rcpts: list[str], subject: str, extra: str = "") -> None:
    message = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n{extra}\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.sendmail(sender, rcpts, message.encode())


def files_with(folder: Path, marker: bytes) -> list[Path]:
    return [
        p
        for sub in ("new", "cur")
        if (folder / sub).is_dir()
        for p in (folder / sub).iterdir()
        if marker in p.read_bytes()
    ]


def arrived(mta: ScriptedMta, marker: bytes) -> list[Received]:
    return [r for r in list(mta.received) if marker in r.data]


def test_put_refuses_a_syntax_error_with_line_and_column(net: Net) -> None:
    path = net.root / "bad.sieve"
    path.write_text('require "fileinto";\nif header :is "x" {\n')
    result = net.srv.cli("sieve", "put", "bob@example.test", str(path), check=False)
    assert result.returncode == 1
    assert "bad.sieve:3:1: unexpected end of script" in result.stderr
    path.write_text('fileinto "x";\n')
    result = net.srv.cli("sieve", "put", "bob@example.test", str(path), check=False)
    assert "1:1: fileinto needs require 'fileinto'" in result.stderr
    assert net.srv.cli("sieve", "list", "bob@example.test").stdout == ""


def test_fileinto_a_folder_with_flags(net: Net) -> None:
    net.put(
        "bob@example.test",
        'require ["fileinto", "mailbox", "imap4flags"];\n'
        'if header :contains "subject" "[lists]" {\n'
        '  fileinto :create :flags "\\\\Seen" "Lists/Python";\n'
        "}\n",
    )
    assert net.srv.cli("sieve", "list", "bob@example.test").stdout == "rules  (active)\n"
    assert "Lists/Python" in net.srv.cli("sieve", "get", "bob@example.test").stdout
    send(net, SOMEONE, ["bob@example.test"], "[lists] sieve-fileinto-1")
    send(net, SOMEONE, ["bob@example.test"], "sieve-fileinto-2")
    maildir = net.srv.maildir("bob@example.test")
    (filed,) = files_with(maildir / ".Lists.Python", b"sieve-fileinto-1")
    assert filed.parent.name == "cur" and filed.name.endswith(":2,S")
    assert files_with(maildir, b"sieve-fileinto-1") == []  # the keep was cancelled
    assert len(files_with(maildir, b"sieve-fileinto-2")) == 1  # implicit keep


def test_redirect_goes_out_through_the_queue_with_srs(net: Net) -> None:
    net.put("carol@example.test", 'redirect "out@remote.test";\n')
    send(net, SOMEONE, ["carol@example.test"], "sieve-redirect-1")
    assert wait_for(lambda: len(arrived(net.remote, b"sieve-redirect-1")) == 1), net.srv.log()
    (msg,) = arrived(net.remote, b"sieve-redirect-1")
    assert msg.recipients == ["<out@remote.test>"]
    assert msg.sender.startswith("<SRS0=") and msg.sender.endswith("@example.test>")
    assert files_with(net.srv.maildir("carol@example.test"), b"sieve-redirect-1") == []


def test_vacation_answers_once_within_days(net: Net) -> None:
    net.put(
        "dave@example.test",
        'require "vacation";\nvacation :days 7 :subject "Away" "I am away until Monday.";\n',
    )
    send(net, SOMEONE, ["dave@example.test"], "sieve-vacation-1")
    assert wait_for(lambda: len(arrived(net.origin, b"I am away until Monday.")) == 1)
    (reply,) = arrived(net.origin, b"I am away until Monday.")
    assert reply.sender == "<>"
    assert reply.recipients == [f"<{SOMEONE}>"]
    assert b"Auto-Submitted: auto-replied" in reply.data
    assert b"Subject: Away" in reply.data
    # Kept as well, and a second message within :days gets no reply.
    assert files_with(net.srv.maildir("dave@example.test"), b"sieve-vacation-1")
    send(net, SOMEONE, ["dave@example.test"], "sieve-vacation-2")
    # A list message gets none either.
    send(net, "other@elsewhere.test", ["dave@example.test"], "sieve-vacation-3",
         "List-Id: <x.lists.elsewhere.test>\r\n")  # fmt: skip
    assert files_with(net.srv.maildir("dave@example.test"), b"sieve-vacation-3")
    time.sleep(3)
    assert len(arrived(net.origin, b"I am away until Monday.")) == 1


def test_no_vacation_loop_between_two_local_users(net: Net) -> None:
    vacation = 'require "vacation";\nvacation :days 1 "{} is away.";\n'
    net.put("erin@example.test", vacation.format("erin"))
    net.put("frank@example.test", vacation.format("frank"))
    send(net, "erin@example.test", ["frank@example.test"], "sieve-loop-1")
    erin = net.srv.maildir("erin@example.test")
    assert wait_for(lambda: len(files_with(erin, b"frank is away.")) == 1), net.srv.log()
    time.sleep(3)
    assert len(files_with(erin, b"frank is away.")) == 1
    assert files_with(net.srv.maildir("frank@example.test"), b"erin is away.") == []
    assert len(files_with(net.srv.maildir("frank@example.test"), b"sieve-loop-1")) == 1


def test_a_failing_script_delivers_to_inbox_and_logs_why(net: Net) -> None:
    # Five redirects: past the bound of four per message (RunLimits.max_redirects).
    net.put(
        "bob@example.test",
        "".join(f'redirect "r{i}@remote.test";\n' for i in range(5)),
        name="greedy",
    )
    send(net, SOMEONE, ["bob@example.test"], "sieve-runtime-error-1")
    assert len(files_with(net.srv.maildir("bob@example.test"), b"sieve-runtime-error-1")) == 1
    assert "script error, delivered to INBOX: too many redirects" in net.srv.log()
    time.sleep(2)
    assert arrived(net.remote, b"sieve-runtime-error-1") == []


def test_ereject_refuses_at_smtp_time_for_one_recipient_else_bounces(net: Net) -> None:
    net.put(
        "erin@example.test",
        'require "ereject";\nif header :contains "subject" "spam-word" { ereject "No spam here"; }\n',
        name="reject",
    )
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(net, SOMEONE, ["erin@example.test"], "sieve-ereject-1 spam-word")
    assert info.value.smtp_code == 550
    assert b"No spam here" in info.value.smtp_error
    assert files_with(net.srv.maildir("erin@example.test"), b"sieve-ereject-1") == []
    # Two recipients: accepted for both; erin's script bounces its copy.
    send(net, SOMEONE, ["erin@example.test", "bob@example.test"], "sieve-ereject-2 spam-word")
    assert files_with(net.srv.maildir("erin@example.test"), b"sieve-ereject-2") == []
    assert len(files_with(net.srv.maildir("bob@example.test"), b"sieve-ereject-2")) == 1
    assert wait_for(lambda: len(arrived(net.origin, b"sieve-ereject-2")) == 1), net.srv.log()
    (notice,) = arrived(net.origin, b"sieve-ereject-2")
    assert notice.sender == "<>" and notice.recipients == [f"<{SOMEONE}>"]
    assert_reject_dsn(notice.data, "erin@example.test", "No spam here")
    assert b"hi\r\n" not in notice.data.split(b"\r\n\r\n", 1)[1]  # headers only, no content


def assert_reject_dsn(data: bytes, mailbox: str, reason: str) -> None:
    """RFC 5429 §2.1.2 by way of RFC 3464: a multipart/report whose
    delivery-status says the mailbox failed with 5.7.1, the reason readable."""
    dsn = email.message_from_bytes(data)
    assert dsn["Auto-Submitted"] == "auto-replied"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts: dict[str, email.message.Message] = {}
    for part in dsn.walk():  # the first of each type (delivery-status blocks parse as text/plain)
        parts.setdefault(part.get_content_type(), part)
    assert reason in str(parts["text/plain"].get_payload(decode=True), "utf-8")
    status = parts["message/delivery-status"].as_string()
    assert f"Final-Recipient: rfc822; {mailbox}" in status
    assert "Action: failed" in status and "Status: 5.7.1" in status
    assert "Subject: " in parts["text/rfc822-headers"].as_string()


def test_reject_never_bounces_to_the_null_sender_or_automatic_mail(net: Net) -> None:
    net.put(
        "hank@example.test",
        'require "reject";\nif header :contains "subject" "nope" { reject "Not wanted"; }\n',
        name="reject",
    )
    two = ["hank@example.test", "bob@example.test"]
    send(net, "", two, "sieve-reject-null nope")
    send(net, SOMEONE, two, "sieve-reject-auto nope", "Auto-Submitted: auto-generated\r\n")
    send(net, SOMEONE, two, "sieve-reject-plain nope")
    assert wait_for(lambda: len(arrived(net.origin, b"sieve-reject-plain")) == 1), net.srv.log()
    (notice,) = arrived(net.origin, b"sieve-reject-plain")
    assert_reject_dsn(notice.data, "hank@example.test", "Not wanted")
    hank = net.srv.maildir("hank@example.test")
    for subject in (b"sieve-reject-null", b"sieve-reject-auto", b"sieve-reject-plain"):
        assert files_with(hank, subject) == []  # rejected: no copy kept
        assert len(files_with(net.srv.maildir("bob@example.test"), subject)) == 1
    time.sleep(2)
    assert arrived(net.origin, b"sieve-reject-null") == []
    assert arrived(net.origin, b"sieve-reject-auto") == []
    net.srv.cli("sieve", "activate", "hank@example.test", "--none")


def test_reject_of_a_large_message_bounces_after_delivery(net: Net) -> None:
    # Past the in-memory bound (storage/maildir.py SPILL_THRESHOLD): judged
    # from the stored file after the 250, even with one recipient.
    net.put(
        "erin@example.test",
        'require "ereject";\nif header :contains "subject" "spam-word" { ereject "Too spammy"; }\n',
        name="reject",
    )
    big = "\r\n".join(["y" * 76] * 6000)  # about 460 KiB
    message = (
        f"From: {SOMEONE}\r\nSubject: sieve-ereject-huge spam-word\r\n\r\n{big}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.sendmail(SOMEONE, ["erin@example.test"], message)
    assert wait_for(lambda: len(arrived(net.origin, b"sieve-ereject-huge")) == 1), net.srv.log()
    (notice,) = arrived(net.origin, b"sieve-ereject-huge")
    assert_reject_dsn(notice.data, "erin@example.test", "Too spammy")
    assert len(notice.data) < 16 * 1024  # the headers came back, not the content
    assert files_with(net.srv.maildir("erin@example.test"), b"sieve-ereject-huge") == []


def test_envelope_sees_the_rcpt_to_address_as_given(net: Net) -> None:
    net.put(
        "gina@example.test",
        'require ["envelope", "subaddress", "fileinto", "mailbox"];\n'
        'if envelope :detail "to" "lists" { fileinto :create "Lists"; }\n'
        'elsif envelope :localpart :is "to" "team" { fileinto :create "Team"; }\n'
        'elsif envelope :user "to" "gina" { fileinto :create "Direct"; }\n',
    )
    send(net, SOMEONE, ["gina+lists@example.test"], "sieve-env-detail")
    send(net, SOMEONE, ["team@example.test"], "sieve-env-alias")
    send(net, SOMEONE, ["gina@example.test"], "sieve-env-plain")
    send(net, SOMEONE, ["bob@example.test", "gina+lists@example.test"], "sieve-env-two")
    gina = net.srv.maildir("gina@example.test")
    assert len(files_with(gina / ".Lists", b"sieve-env-detail")) == 1, net.srv.log()
    assert len(files_with(gina / ".Team", b"sieve-env-alias")) == 1
    assert len(files_with(gina / ".Direct", b"sieve-env-plain")) == 1
    assert len(files_with(gina / ".Lists", b"sieve-env-two")) == 1
    assert files_with(gina, b"sieve-env-") == []  # none left in INBOX


def send_mime(net: Net, rcpt: str, subject: str, parts: list[tuple[str, str, str]]) -> None:
    """A multipart/alternative message; each part (type, transfer encoding, encoded text)."""
    body = "".join(
        f"--b1\r\nContent-Type: {ctype}; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n{text}\r\n"
        for ctype, cte, text in parts
    )
    message = (
        f"From: {SOMEONE}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        f"prologue\r\n{body}--b1--\r\n"
    )
    with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
        client.sendmail(SOMEONE, [rcpt], message.encode())


def test_body_raw_content_and_text(net: Net) -> None:
    net.put(
        "hank@example.test",
        'require ["body", "fileinto", "mailbox"];\n'
        'if body :content "text/html" :contains "secret-html" { fileinto :create "Html"; }\n'
        'elsif body :raw :contains "plain=2Dmarker" { fileinto :create "Raw"; }\n'
        'elsif body :text :contains "plain-marker" { fileinto :create "Text"; }\n'
        'elsif body :content "multipart" :contains "prologue" { fileinto :create "Multi"; }\n',
    )
    hank = net.srv.maildir("hank@example.test")
    # base64 of "<p>secret-html</p>": only :content decodes it.
    send_mime(net, "hank@example.test", "sieve-body-html",
              [("text/plain", "7bit", "hello"), ("text/html", "base64", "PHA+c2VjcmV0LWh0bWw8L3A+")])  # fmt: skip
    # Quoted-printable "plain-marker": :raw sees it encoded.
    send_mime(net, "hank@example.test", "sieve-body-raw", [("text/plain", "quoted-printable", "plain=2Dmarker")])  # fmt: skip
    # base64 of "plain-marker": only the decoded :text has it.
    send_mime(net, "hank@example.test", "sieve-body-text", [("text/plain", "base64", "cGxhaW4tbWFya2Vy")])  # fmt: skip
    # "secret-html" in a text/plain part is not text/html's; the prologue is multipart's.
    send_mime(net, "hank@example.test", "sieve-body-multi", [("text/plain", "7bit", "secret-html")])  # fmt: skip
    assert len(files_with(hank / ".Html", b"sieve-body-html")) == 1, net.srv.log()
    assert len(files_with(hank / ".Raw", b"sieve-body-raw")) == 1
    assert len(files_with(hank / ".Text", b"sieve-body-text")) == 1
    assert len(files_with(hank / ".Multi", b"sieve-body-multi")) == 1
    net.srv.cli("sieve", "activate", "hank@example.test", "--none")


def test_body_reads_no_further_than_its_bound(net: Net) -> None:
    net.put(
        "hank@example.test",
        'require ["body", "fileinto", "mailbox"];\n'
        'if body :raw :contains "far-marker" { fileinto :create "Far"; }\n',
        name="far",
    )
    filler = "\r\n".join(["z" * 76] * 5000)  # about 390 KiB, past BODY_LIMIT (256 KiB)
    for subject, body in (("sieve-far-early", f"far-marker\r\n{filler}"),
                          ("sieve-far-late", f"{filler}\r\nfar-marker")):  # fmt: skip
        message = f"From: {SOMEONE}\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()
        with smtplib.SMTP("127.0.0.1", net.srv.ports["smtp"], timeout=30) as client:
            client.sendmail(SOMEONE, ["hank@example.test"], message)
    hank = net.srv.maildir("hank@example.test")
    assert len(files_with(hank / ".Far", b"sieve-far-early")) == 1, net.srv.log()
    assert len(files_with(hank, b"sieve-far-late")) == 1  # not seen: kept in INBOX
    net.srv.cli("sieve", "activate", "hank@example.test", "--none")
