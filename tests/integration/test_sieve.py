"""Sieve at delivery, end to end: the real server, smtplib, dnsmasq and peer MTAs.

Scripts are stored with ``postoffice sieve put`` while the server runs;
then real SMTP deliveries show fileinto (into an IMAP folder, flags in the
``:2,`` part), redirect (out through the queue with an SRS sender), vacation
(one reply per sender within :days, from the null sender, auto-replied) and
no vacation loop between two local users who both have vacation on.  A
broken or failing script delivers to INBOX.
"""

from __future__ import annotations

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
    for user in ("bob", "carol", "dave", "erin", "frank"):
        srv.add_user(f"{user}@example.test", f"{user}-password-2")
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
    assert wait_for(lambda: len(arrived(net.origin, b"Rejected: sieve-ereject-2")) == 1)
    (notice,) = arrived(net.origin, b"Rejected: sieve-ereject-2")
    assert notice.sender == "<>" and b"No spam here" in notice.data
