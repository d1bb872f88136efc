"""IMAP IDLE (RFC 2177) woken by the folder watcher, against the real server.

Each wake-up is timed and must come within 1 s (the issue's bound): an SMTP
delivery, a file another program drops into new/, a POP3 DELE+QUIT (as
EXPUNGE), two idling sessions on one folder.  And no session polls the disk
while idle: strace on the server sees no look at the folder until it changes.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.helpers import wait_for
from tests.support.imap import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    context,
    deliver_smtp,
    empty_inbox,
    imaps,
)
from tests.support.server import PostofficeServer

BOUND = 1.0  # seconds: the bound on IDLE latency


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path_factory.mktemp("imap-idle"))
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, BOB_PW)
    server.start()
    yield server
    server.stop()


def start_idle(client: imaplib.IMAP4) -> str:
    tag = client._new_tag().decode()
    client.send(f"{tag} IDLE\r\n".encode())
    assert client.readline().startswith(b"+")
    return tag


def end_idle(client: imaplib.IMAP4, tag: str) -> None:
    client.send(b"DONE\r\n")
    while True:  # untagged lines may still come before the tagged OK
        line = client.readline()
        if line.startswith(tag.encode()):
            assert b" OK" in line, line
            return


def timed_line(client: imaplib.IMAP4, change: Callable[[], None]) -> tuple[bytes, float]:
    """Make ``change``; the next line the idling client reads, and how long
    after the change was made it came."""
    change()
    done = time.monotonic()
    line = client.readline()
    return line, time.monotonic() - done


def drop_into_new(srv: PostofficeServer, name: str) -> None:
    """Another MDA's delivery: write in tmp/, rename into new/ (Maildir)."""
    md = srv.maildir(ALICE)
    tmp = md / "tmp" / name
    tmp.write_bytes(b"From: x@example.test\nSubject: dropped\n\nhi\n")
    os.rename(tmp, md / "new" / name)


def idle_on_inbox(srv: PostofficeServer) -> tuple[imaplib.IMAP4_SSL, str]:
    client = imaps(srv)
    client.select("INBOX")
    return client, start_idle(client)


def test_smtp_delivery_reaches_idle_within_a_second(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    client, tag = idle_on_inbox(srv)
    started = time.monotonic()
    line, took = timed_line(client, lambda: deliver_smtp(srv, "idle-smtp"))
    assert re.match(rb"\* 1 EXISTS", line), line
    assert took < BOUND, took  # after the SMTP 250
    assert time.monotonic() - started < BOUND + 1.0  # the delivery itself included
    end_idle(client, tag)
    client.logout()


def test_a_file_another_program_drops_into_new(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    client, tag = idle_on_inbox(srv)
    line, took = timed_line(client, lambda: drop_into_new(srv, "1700000000.other.host"))
    assert re.match(rb"\* 1 EXISTS", line), line
    assert took < BOUND, took
    end_idle(client, tag)
    client.logout()


def test_pop3_dele_shows_as_expunge_in_idle(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    deliver_smtp(srv, "for-pop")
    assert wait_for(lambda: len(srv.messages(ALICE)) == 1)
    client, tag = idle_on_inbox(srv)

    def dele() -> None:
        pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context(srv))
        pop.user(ALICE)
        pop.pass_(ALICE_PW)
        pop.dele(1)
        pop.quit()  # RFC 1939 §6: the UPDATE state removes it now

    line, took = timed_line(client, dele)
    assert line.startswith(b"* 1 EXPUNGE"), line
    assert took < BOUND, took
    end_idle(client, tag)
    client.logout()


def test_two_idling_sessions_are_both_woken(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    first, tag1 = idle_on_inbox(srv)
    second, tag2 = idle_on_inbox(srv)
    drop_into_new(srv, "1700000001.both.host")
    done = time.monotonic()
    for client in (first, second):
        assert re.match(rb"\* 1 EXISTS", client.readline())
    assert time.monotonic() - done < BOUND
    for client, tag in ((first, tag1), (second, tag2)):
        end_idle(client, tag)
        client.logout()


def test_no_polling_while_idle(
    srv: PostofficeServer, require_program: Callable[[str], str]
) -> None:
    """The server looks at nothing of the folder while it does not change
    (no per-session stat loop), and does once it does (the control: the
    trace would see a look)."""
    strace = require_program("strace")
    empty_inbox(srv, ALICE)
    client, tag = idle_on_inbox(srv)
    assert srv.proc is not None
    trace = srv.data_dir / "idle.strace"
    command = [strace, "-f", "-ttt", "-e", "trace=%file,%stat", "-o", str(trace)]
    tracer = subprocess.Popen(
        [*command, "-p", str(srv.proc.pid)],
        stderr=subprocess.PIPE,
    )
    try:
        assert tracer.stderr is not None
        assert b"attached" in tracer.stderr.readline()  # tracing from here on
        quiet_from = time.time()
        time.sleep(2.5)  # two and a half of the old 1 s checks
        quiet_to = time.time()
        drop_into_new(srv, "1700000002.traced.host")
        assert re.match(rb"\* 1 EXISTS", client.readline())
        time.sleep(0.2)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        if tracer.stderr is not None:
            tracer.stderr.close()
    folder = str(srv.maildir(ALICE))
    looks = []
    for entry in trace.read_text().splitlines():
        fields = entry.split(None, 2)
        if len(fields) == 3 and folder in fields[2]:
            looks.append((float(fields[1]), fields[2]))
    quiet = [call for when, call in looks if quiet_from <= when < quiet_to]
    assert quiet == [], quiet[:5]
    assert any(when >= quiet_to for when, _call in looks), "the trace saw no look at all"
    end_idle(client, tag)
    client.logout()


def test_bob_idles_in_authenticated_state_until_done(srv: PostofficeServer) -> None:
    """No folder selected: nothing to watch, IDLE still ends on DONE."""
    client = imaps(srv, BOB, BOB_PW)
    tag = start_idle(client)
    end_idle(client, tag)
    client.logout()
