"""A flood of logins does not slow POP3 reads or queue commits: hashing has its own threads.

Password checks (argon2id: tens of milliseconds of CPU and 64 MiB each) run
in ``HashingPool``, sized by the CPUs the process may use, never in the
shared I/O pool that POP3 reads, queue commits and DKIM use.  They used to
run in the shared pool (8 threads) behind a semaphore of ``os.cpu_count()``:
on a machine whose CPU count is larger than the process's share (a
container on a big host: ``os.cpu_count()`` says 16, the cpuset allows 2),
guesses took every I/O thread and a RETR waited seconds.

The server runs in a mount namespace of its own where
/sys/devices/system/cpu/online says 0-15, so ``os.cpu_count()`` is 16 while
the process may still run on only the CPUs it has: that container.  Sixteen
clients then guess passwords as fast as they are answered, from addresses
of their own (so no per-address limit holds them), while one client reads a
message over POP3 and another submits mail for a remote address (a queue
commit), again and again, for a bounded time.
"""

from __future__ import annotations

import poplib
import smtplib
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, ALICE_PW, BOB, BOB_PW, plain_auth
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.load

FLOODERS = 16
MEASURE_FOR = 6.0  # seconds
MESSAGE = b"Subject: x\r\nFrom: a@remote.test\r\n\r\n" + (b"y" * 76 + b"\r\n") * 2600  # 200 KB


@pytest.fixture
def big_host_server(
    tmp_path: Path, require_program: Callable[[str], str]
) -> Iterator[PostofficeServer]:
    unshare = require_program("unshare")
    online = tmp_path / "cpu-online"
    online.write_text("0-15\n")
    srv = PostofficeServer(
        tmp_path,
        sections={
            # Old and new servers alike judge every guess: no pair delays here.
            "auth": {"throttle_after": 100_000, "allow_plaintext_loopback": True},
            "relay": {"smarthost": "127.0.0.1:9"},  # the queue keeps what it gets
        },
    )
    srv.add_user(ALICE, ALICE_PW)
    srv.add_user(BOB, BOB_PW)
    mount = 'mount --bind "$0" /sys/devices/system/cpu/online && exec "$@"'
    srv.start(prefix=[unshare, "--mount", "sh", "-c", mount, str(online)])
    yield srv
    srv.stop()


def flood(srv: PostofficeServer, n: int, stop: threading.Event) -> int:
    client = RawSmtp("127.0.0.1", srv.ports["submission"], source=f"127.1.{n}.1", timeout=60)
    client.reply()
    client.cmd("EHLO flood.test")
    guesses = 0
    while not stop.is_set() and guesses < 1000:
        code, _ = client.cmd(f"AUTH PLAIN {plain_auth(f'u{n}-{guesses}@example.test', 'x')}")
        guesses += 1
        if code == 454:  # refused unjudged: no hashing to wait for, do not spin
            time.sleep(0.05)
    return guesses


def test_a_login_flood_does_not_delay_pop3_reads_or_queue_commits(
    big_host_server: PostofficeServer, report: Callable[[str, object, str], None]
) -> None:
    srv = big_host_server
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as s:
        s.sendmail("a@remote.test", [BOB], MESSAGE)
    stop = threading.Event()
    flooders = [
        threading.Thread(target=flood, args=(srv, n, stop), daemon=True) for n in range(FLOODERS)
    ]
    for t in flooders:
        t.start()
    retr: list[float] = []
    commit: list[float] = []
    try:
        time.sleep(1.0)  # the flood is under way
        judged_before = srv.log().count("auth failed")
        pop = poplib.POP3("127.0.0.1", srv.ports["pop3"], timeout=60)
        pop.user(BOB)
        pop.pass_(BOB_PW)
        sub = smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=60)
        sub.login(ALICE, ALICE_PW)
        deadline = time.monotonic() + MEASURE_FOR
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert len(b"".join(pop.retr(1)[1])) > 190_000
            retr.append(time.monotonic() - started)
            started = time.monotonic()
            sub.sendmail(ALICE, ["far@remote.test"], b"Subject: q\r\n\r\nqueued\r\n")
            commit.append(time.monotonic() - started)
        judged = srv.log().count("auth failed") - judged_before
        pop.quit()
        sub.quit()
    finally:
        stop.set()
        for t in flooders:
            t.join(30)

    def p90(values: list[float]) -> float:
        return sorted(values)[int(len(values) * 0.9)]

    report("auth flood: guesses judged while measuring", judged, "")
    report("auth flood: POP3 RETR 200 KB median", statistics.median(retr) * 1000, "ms")
    report("auth flood: POP3 RETR 200 KB p90", p90(retr) * 1000, "ms")
    report("auth flood: queue commit median", statistics.median(commit) * 1000, "ms")
    report("auth flood: queue commit p90", p90(commit) * 1000, "ms")
    assert judged >= 10  # the hashing really was busy all along
    # Sharing the I/O pool, these took about 3 s each (hash jobs ahead of them).
    assert statistics.median(retr) < 0.2 and p90(retr) < 1.0, retr
    assert statistics.median(commit) < 0.2 and p90(commit) < 1.0, commit
