"""``postoffice trace``: a relayed message, deferred then delivered, end to end.

The real server relays through a real DNS server (dnsmasq: MX of
remote.test) to a scripted peer that answers the first session's RCPT
with 451 (greylisting) and accepts the next (tests/faults/peers.py).  Then
``postoffice trace`` (the CLI, a process of its own) reads the mail log the
server wrote ([log] file, text or json, rotated the way logrotate leaves it)
and must show received -> queued -> deferred (with the peer's words) ->
delivered, in that order, by queue id and by address.  Local mail shows
its mailbox file and its POP3 retrieval and deletion.
"""

from __future__ import annotations

import gzip
import imaplib
import json
import os
import poplib
import re
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.peers import FaultyMta
from tests.support.helpers import ALICE, BOB, BOB_PW, make_server, submission, wait_for
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

MX = "127.0.0.2"
CAROL = "carol@remote.test"


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(
        tmp_path_factory.mktemp("dns"),
        mx=[("remote.test", "mx1.remote.test", 10)],
        hosts={"mx1.remote.test": [MX]},
    ).start()
    yield server
    server.stop()


@pytest.fixture
def greylisting() -> Iterator[FaultyMta]:
    peer = FaultyMta(MX, free_port((MX,)), "greylist").start()
    yield peer
    peer.stop()


def relay_server(root: Path, dns: Dnsmasq, peer: FaultyMta, fmt: str) -> PostofficeServer:
    return make_server(
        root,
        relay={
            "mx_port": peer.port,
            "dns_servers": [dns.server],
            "retry_schedule": [2],  # time enough to rotate the log between the attempts
            "connect_timeout": 5,
        },
        log={"file": str(root / "mail.log"), "format": fmt},
    )


def send(srv: PostofficeServer, rcpt: str, subject: str) -> str:
    """Submit a message; its queue id, from the 250 reply."""
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(f"From: {ALICE}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
    code, lines = client.reply()
    assert code == 250, lines
    client.cmd("QUIT")
    match = re.search(r"queued as (\S+)", lines[-1])
    assert match, lines
    return match.group(1)


def trace(srv: PostofficeServer, *args: str) -> list[str]:
    result = srv.cli("trace", *args)
    return result.stdout.splitlines()


def events(lines: list[str]) -> list[str]:
    """The event column of trace's timeline lines (date time id event fields)."""
    return [line.split()[3] for line in lines if not line.startswith((" ", "in the queue"))]


def line_of(lines: list[str], event: str) -> str:
    (found,) = [line for line in lines if line.split()[3:4] == [event]]
    return found


def assert_deferred_then_delivered(lines: list[str], queue_id: str) -> None:
    assert events(lines) == ["received", "queued", "deferred", "delivered"], "\n".join(lines)
    assert all(f"  {queue_id}  " in line for line in lines), lines
    received = line_of(lines, "received")
    assert f"from=<{ALICE}>" in received and f"to=<{CAROL}>" in received
    assert "client=127.0.0.1" in received and "tls=stls" in received
    assert f"user={ALICE}" in received and "mode=submission" in received
    deferred = line_of(lines, "deferred")
    assert "relay=mx1.remote.test[127.0.0.2]" in deferred
    assert 'reply="451 4.7.1 Greylisted, please try again later"' in deferred
    delivered = line_of(lines, "delivered")
    assert "tries=2" in delivered and "PEER0001" in delivered


def test_a_deferred_then_delivered_message_by_id_and_by_address(
    tmp_path: Path, dns: Dnsmasq, greylisting: FaultyMta
) -> None:
    srv = relay_server(tmp_path, dns, greylisting, "text")
    try:
        queue_id = send(srv, CAROL, "greylisted")
        log = tmp_path / "mail.log"
        assert wait_for(lambda: f"delivered id={queue_id}" in log.read_text())
        assert greylisting.sessions == 2 and len(greylisting.octets) == 1
        assert_deferred_then_delivered(trace(srv, queue_id), queue_id)
        assert_deferred_then_delivered(trace(srv, CAROL), queue_id)
        assert_deferred_then_delivered(trace(srv, f"<{CAROL.upper()}>", "--since", "1h"), queue_id)
        # Every record of the text log is key=value fields the parser reads back.
        assert_deferred_then_delivered(trace(srv, ALICE), queue_id)
        # --since after it all: nothing, said on stderr, exit 1.
        later = srv.cli("trace", queue_id, "--since", "2999-01-01T00:00", check=False)
        assert later.returncode == 1 and later.stdout == ""
        assert "no record" in later.stderr
    finally:
        srv.stop()


def test_waiting_message_shows_its_queue_state(
    tmp_path: Path, dns: Dnsmasq, greylisting: FaultyMta
) -> None:
    srv = relay_server(tmp_path, dns, greylisting, "text")
    try:
        greylisting.stop()  # nobody answers: the message stays deferred
        queue_id = send(srv, CAROL, "waiting")
        log = tmp_path / "mail.log"
        assert wait_for(lambda: f"deferred id={queue_id}" in log.read_text())
        lines = trace(srv, queue_id)
        assert events(lines)[:3] == ["received", "queued", "deferred"], lines
        assert "in the queue now:" in lines
        assert any(line.strip().startswith(f"deferred  <{CAROL}>") for line in lines), lines
    finally:
        srv.stop()


def rotate(log: Path, pid: int, *, compress_older: bool) -> None:
    """What logrotate does with ``compress`` and ``delaycompress``: name.1
    becomes name.2.gz, name becomes name.1, and the server is told (SIGUSR1)."""
    one = log.with_name(log.name + ".1")
    if compress_older and one.exists():
        with open(one, "rb") as src, gzip.open(log.with_name(log.name + ".2.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        one.unlink()
    os.rename(log, one)
    os.kill(pid, signal.SIGUSR1)
    assert wait_for(lambda: log.exists() and "log file reopened" in log.read_text())


def test_json_log_across_rotated_files(
    tmp_path: Path, dns: Dnsmasq, greylisting: FaultyMta
) -> None:
    srv = relay_server(tmp_path, dns, greylisting, "json")
    assert srv.proc is not None
    log = tmp_path / "mail.log"
    try:
        queue_id = send(srv, CAROL, "rotated")
        assert wait_for(lambda: f'"deferred","id":"{queue_id}"' in log.read_text())
        rotate(log, srv.proc.pid, compress_older=False)
        assert wait_for(lambda: f'"delivered","id":"{queue_id}"' in log.read_text())
        rotate(log, srv.proc.pid, compress_older=True)
        # The message's life is now spread over name.2.gz and name.1.
        older = gzip.decompress((tmp_path / "mail.log.2.gz").read_bytes()).decode()
        newer = (tmp_path / "mail.log.1").read_text()
        assert f'"received","id":"{queue_id}"' in older and queue_id not in log.read_text()
        assert f'"delivered","id":"{queue_id}"' in newer
        # Every line is one JSON object; the mail events carry their fields as members.
        records = [json.loads(line) for line in (older + newer).splitlines()]
        (received,) = [r for r in records if r.get("event") == "received"]
        assert received["id"] == queue_id and received["to"] == [CAROL]
        assert received["from"] == ALICE and received["result"] == 250
        assert_deferred_then_delivered(trace(srv, queue_id), queue_id)
        assert_deferred_then_delivered(trace(srv, CAROL), queue_id)
    finally:
        srv.stop()


def test_local_mail_shows_its_file_and_pop3_retrieval(
    tmp_path: Path, dns: Dnsmasq, greylisting: FaultyMta
) -> None:
    srv = relay_server(tmp_path, dns, greylisting, "text")
    try:
        queue_id = send(srv, BOB, "for bob")
        (path,) = srv.messages(BOB)
        pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], timeout=10, context=_no_check())
        try:
            pop.user(BOB)
            pop.pass_(BOB_PW)
            pop.retr(1)
            pop.dele(1)
        finally:
            pop.quit()
        log = tmp_path / "mail.log"
        assert wait_for(lambda: "deleted protocol=pop3" in log.read_text())
        lines = trace(srv, queue_id)
        assert events(lines) == ["received", "stored", "retrieved", "deleted"], lines
        stem = path.name.partition(":2,")[0]
        assert f"mailbox=<{BOB}>" in line_of(lines, "stored")
        assert all(f"file={json.dumps(stem)}" in line for line in lines[1:]), lines  # has "="
        assert f"user={BOB}" in line_of(lines, "retrieved")
        # By the reader's address too.
        assert events(trace(srv, BOB)) == ["received", "stored", "retrieved", "deleted"]
    finally:
        srv.stop()


def _no_check() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_local_mail_imap_download_and_expunge(
    tmp_path: Path, dns: Dnsmasq, greylisting: FaultyMta
) -> None:
    srv = relay_server(tmp_path, dns, greylisting, "json")
    try:
        queue_id = send(srv, BOB, "for bob over imap")
        with imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=_no_check()) as imap:
            imap.login(BOB, BOB_PW)
            imap.select("INBOX")
            imap.fetch("1", "(BODY.PEEK[HEADER])")  # headers only: not a download
            imap.fetch("1", "(BODY.PEEK[])")
            imap.store("1", "+FLAGS", "\\Deleted")
            imap.expunge()
        log = tmp_path / "mail.log"
        assert wait_for(lambda: '"event":"deleted"' in log.read_text())
        lines = trace(srv, queue_id)
        assert events(lines) == ["received", "stored", "retrieved", "deleted"], lines
        assert all("protocol=imap" in line for line in lines[2:]), lines
    finally:
        srv.stop()


def test_a_large_log_is_read_as_a_stream(tmp_path: Path) -> None:
    """trace keeps only the records it shows: its peak memory over a log of
    100,000 other messages (about 40 MB) is that of a log of one line
    (measured as the CLI's maximum resident size, a process of its own)."""
    srv = PostofficeServer(tmp_path)

    def line(n: int, queue_id: str) -> str:
        return (
            f"2026-12-05T12:00:{n % 60:02d}.000+00:00 postoffice[7]: INFO postoffice.mail:"
            f" received id={queue_id} from=<s{n}@client.test> to=<bob@remote.test>"
            f" size={n} client=192.0.2.1 helo=client.test proto=ESMTPS"
            f' result=250 reply="{"x" * 200}"'
        )

    def peak_kib(log: Path) -> int:
        """The trace CLI's maximum resident set size, in KiB (Linux ru_maxrss)."""
        script = (
            "import resource, subprocess, sys; "
            "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "assert done.returncode == 0, done.stderr; "
            "assert 'wanted1' in done.stdout, done.stdout; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        command = [sys.executable, "-m", "postoffice", "-c", str(srv.config)]
        command += ["trace", "wanted1", "--log", str(log)]
        out = subprocess.run(
            [sys.executable, "-c", script, *command],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return int(out.stdout)

    small = tmp_path / "small.log"
    small.write_text(line(0, "wanted1") + "\n")
    large = tmp_path / "large.log"
    with large.open("w") as out:
        for n in range(100_000):
            out.write(line(n, f"other{n}") + "\n")
            if n == 50_000:
                out.write(line(n, "wanted1") + "\n")
    assert large.stat().st_size > 35_000_000
    grown = peak_kib(large) - peak_kib(small)
    assert grown < 20_000, f"trace grew by {grown} KiB over a 40 MB log"
