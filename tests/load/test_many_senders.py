"""50 clients sending at once for a minute: every 250 is one stored message, nothing else is.

Forty clients speak plain SMTP to port 25 and ten submit with STARTTLS and
AUTH on 587, each over a few long sessions, with a mix of sizes (some
stream to disk) and of one or two recipients (two: one file, hard-linked).
Each message carries a unique tag.  Afterwards every tag the server
acknowledged is in each of its recipients' Maildirs exactly once and
complete, and no Maildir holds a message that was not acknowledged.
Throughput and latency are reported with the other load figures.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, ALICE_PW, BOB, BOB_PW, make_server, rss_kib, tls_context
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.load

DURATION = 60.0  # seconds of sending
CLIENTS_SMTP, CLIENTS_SUBMISSION = 40, 10
MAX_PER_CLIENT = 1500  # a bound on the work, whatever the machine's speed
PER_SESSION = 25  # messages per connection before a new one
SIZES = (600, 2_000, 8_000)  # bytes
STREAMED = 280_000  # every 50th message: big enough to stream to tmp/


def body(tag: str, size: int) -> bytes:
    line = (tag.encode() * 80)[:76] + b"\r\n"
    return line * max(1, size // len(line))


def build(tag: str, size: int, sender: str) -> bytes:
    return f"From: {sender}\r\nSubject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + body(tag, size)


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, list[str]] = {}  # tag -> recipients
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def ack(self, tag: str, rcpts: list[str], took: float) -> None:
        with self.lock:
            self.acked[tag] = rcpts
            self.latencies.append(took)


def sender_loop(srv: PostofficeServer, n: int, submission: bool, stop: float, tally: Tally) -> None:
    who, password = (ALICE, ALICE_PW) if n % 2 else (BOB, BOB_PW)
    sender = who if submission else f"client{n}@remote.test"
    sent = 0
    while sent < MAX_PER_CLIENT and time.monotonic() < stop:
        try:
            if submission:
                client = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=60)
                client.starttls(context=tls_context())
                client.login(who, password)
            else:
                client = smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=60)
            with client:
                for _ in range(PER_SESSION):
                    if sent >= MAX_PER_CLIENT or time.monotonic() >= stop:
                        break
                    tag = f"c{n:02d}m{sent:04d}"
                    rcpts = [ALICE, BOB] if sent % 3 == 0 else [(ALICE, BOB)[sent % 2]]
                    size = STREAMED if (n + sent) % 50 == 0 else SIZES[sent % len(SIZES)]
                    started = time.perf_counter()
                    refused = client.sendmail(sender, rcpts, build(tag, size, sender))
                    assert refused == {}
                    tally.ack(tag, rcpts, time.perf_counter() - started)
                    sent += 1
        except (OSError, smtplib.SMTPException, AssertionError) as exc:
            with tally.lock:
                tally.errors.append(f"client {n}: {exc!r}")
            return


def stored(srv: PostofficeServer, address: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in srv.messages(address):
        content = path.read_bytes()
        tag = re.search(rb"\nX-Tag: (\S+)\n", content).group(1)  # type: ignore[union-attr]
        line = (tag * 80)[:76] + b"\n"
        assert content.split(b"\n\n", 1)[1] == line * (content.count(line)), f"damaged {path}"
        counts[tag.decode()] = counts.get(tag.decode(), 0) + 1
    return counts


def test_fifty_clients_for_a_minute_lose_nothing(
    tmp_path: Path, report: Callable[[str, object, str], None]
) -> None:
    srv = make_server(tmp_path, limits={"max_connections_per_ip": 100})
    try:
        assert srv.proc is not None
        tally = Tally()
        started = time.monotonic()
        stop = started + DURATION
        threads = [
            threading.Thread(target=sender_loop, args=(srv, n, n >= CLIENTS_SMTP, stop, tally))
            for n in range(CLIENTS_SMTP + CLIENTS_SUBMISSION)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DURATION + 120)
        elapsed = time.monotonic() - started
        assert not any(t.is_alive() for t in threads)
        assert tally.errors == []
        rss = rss_kib(srv.proc.pid)

        expected: dict[str, set[str]] = {ALICE: set(), BOB: set()}
        for tag, rcpts in tally.acked.items():
            for rcpt in rcpts:
                expected[rcpt].add(tag)
        for address, tags in expected.items():
            found = stored(srv, address)
            assert sorted(t for t in tags if found.get(t) != 1) == []  # each 250 stored once
            assert sorted(set(found) - tags) == []  # and nothing that was not acknowledged

        count = len(tally.acked)
        lat = sorted(tally.latencies)
        report("concurrent senders", CLIENTS_SMTP + CLIENTS_SUBMISSION, "clients")
        report("messages acknowledged and stored", count, f"in {elapsed:.0f} s")
        report("throughput", count / elapsed, "messages/s")
        report("latency per message, median", 1000 * statistics.median(lat), "ms")
        report("latency per message, 99th percentile", 1000 * lat[int(len(lat) * 0.99)], "ms")
        report("server RSS after the run", rss // 1024, "MiB")
        assert count >= CLIENTS_SMTP + CLIENTS_SUBMISSION  # everyone got through
        shutil.rmtree(srv.data_dir / "mail")  # checked: hundreds of MB nobody needs to keep
    finally:
        srv.stop()
