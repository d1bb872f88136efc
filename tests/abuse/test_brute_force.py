"""Password guessing against SMTP AUTH and POP3: throttled, logged, and harmless to the owner.

The throttle (``policy/auth.py``) delays attempts after ``throttle_after``
failures, per client address and per account, up to ``throttle_max_delay``.
These servers use 2 free failures and a 1-2 s cap, so a test shows the delay
without waiting long.  Only lower bounds of time are asserted: a delay that
exists cannot make an attempt faster than it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import poplib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    make_server,
    plain_auth,
    raw,
    tls_context,
)
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse

FREE, CAP = 2, 2.0


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[PostofficeServer]:
    srv = make_server(tmp_path, auth={"throttle_after": FREE, "throttle_max_delay": CAP})
    yield srv
    srv.stop()


def smtp_login(srv: PostofficeServer, source: str | None = None) -> RawSmtp:
    """A client on 465 (implicit TLS), ready for AUTH."""
    return raw(srv, "submissions", source=source)


def timed_auth(client: RawSmtp, user: str, password: str) -> tuple[int, float]:
    started = time.monotonic()
    code, _ = client.cmd(f"AUTH PLAIN {plain_auth(user, password)}")
    return code, time.monotonic() - started


def timed_pop3_login(srv: PostofficeServer, user: str, password: str) -> tuple[bool, float]:
    client = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], timeout=30, context=tls_context())
    try:
        client.user(user)
        started = time.monotonic()
        try:
            client.pass_(password)
            ok = True
        except poplib.error_proto:
            ok = False
        return ok, time.monotonic() - started
    finally:
        client.close()


def failures_logged(srv: PostofficeServer, protocol: str, user: str) -> int:
    pattern = rf"auth failed protocol={protocol} client=127\.0\.0\.\d+ user={re.escape(user)}$"
    return len(re.findall(pattern, srv.log(), re.M))


def test_smtp_guessing_is_slowed_logged_and_the_owner_still_gets_in(
    guarded: PostofficeServer,
) -> None:
    client = smtp_login(guarded)
    times = []
    for i in range(FREE + 2):
        code, took = timed_auth(client, ALICE, f"guess-{i}")
        assert code == 535
        times.append(took)
    # After the free failures each guess waits: 1 s, then 2 s (the cap).
    assert times[FREE] >= 0.9 and times[FREE + 1] >= 1.9, times
    code, took = timed_auth(client, ALICE, ALICE_PW)
    assert code == 235  # the right password still works, after the delay
    assert took >= 1.9
    assert failures_logged(guarded, "smtp", ALICE) == FREE + 2
    log = guarded.log()
    assert "guess-" not in log and ALICE_PW not in log  # passwords are never logged
    assert re.search(r"auth ok protocol=smtp client=127\.0\.0\.1 user=alice@example\.test", log)


def test_pop3_guessing_is_slowed_logged_and_the_owner_still_gets_in(
    guarded: PostofficeServer,
) -> None:
    times = [timed_pop3_login(guarded, ALICE, f"guess-{i}") for i in range(FREE + 2)]
    assert not any(ok for ok, _ in times)
    assert times[FREE][1] >= 0.9 and times[FREE + 1][1] >= 1.9, times
    ok, took = timed_pop3_login(guarded, ALICE, ALICE_PW)
    assert ok and took >= 1.9
    assert failures_logged(guarded, "pop3", ALICE) == FREE + 2
    assert "guess-" not in guarded.log()


def test_failures_on_one_protocol_slow_the_other(guarded: PostofficeServer) -> None:
    client = smtp_login(guarded)
    for i in range(FREE + 1):
        assert timed_auth(client, BOB, f"guess-{i}")[0] == 535
    ok, took = timed_pop3_login(guarded, BOB, BOB_PW)
    assert ok and took >= 1.9  # one shared throttle: the POP3 login waits too


def test_guessing_unknown_users_is_throttled_and_logged(guarded: PostofficeServer) -> None:
    client = smtp_login(guarded)
    names = [f"user{i}@example.test" for i in range(FREE + 1)] + ["../../etc/passwd"]
    times = [timed_auth(client, name, "guess") for name in names]
    assert all(code == 535 for code, _ in times)
    # The address is throttled even though every name differs.
    assert times[FREE][1] >= 0.9 and times[FREE + 1][1] >= 1.9, times
    assert failures_logged(guarded, "smtp", "user0@example.test") == 1
    assert failures_logged(guarded, "smtp", "-") == 1  # a name that is no address at all


def test_guessing_one_account_from_many_addresses_is_throttled(
    guarded: PostofficeServer,
) -> None:
    # A botnet: every guess from another client address; the account's own
    # record slows them all the same.
    for i in range(FREE):
        client = smtp_login(guarded, source=f"127.0.0.{10 + i}")
        assert timed_auth(client, ALICE, f"guess-{i}")[0] == 535
    client = smtp_login(guarded, source="127.0.0.20")
    code, took = timed_auth(client, ALICE, "guess-x")
    assert code == 535 and took >= 0.9


def test_parallel_guesses_from_one_address_are_not_a_way_around(
    guarded: PostofficeServer,
) -> None:
    # Once the address is over its free failures, guesses sent on many
    # connections at once must still be spaced out, not judged all at once.
    client = smtp_login(guarded)
    for i in range(FREE + 1):
        assert timed_auth(client, f"probe{i}@example.test", "guess")[0] == 535
    parallel = 3
    clients = [smtp_login(guarded) for _ in range(parallel)]
    for c in clients:
        c.sock.settimeout(60)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        codes = list(
            pool.map(lambda c: timed_auth(c, f"{id(c)}@example.test", "guess")[0], clients)
        )
    took = time.monotonic() - started
    assert codes == [535] * parallel
    assert took >= (parallel - 1) * CAP * 0.9, took  # at most one guess per delay


def test_auth_plain_with_another_authzid_is_refused_and_counted(
    guarded: PostofficeServer,
) -> None:
    client = smtp_login(guarded)
    # Log in as alice but act as bob: RFC 4616 authzid; never allowed.
    token = base64.b64encode(f"{BOB}\0{ALICE}\0{ALICE_PW}".encode()).decode()
    assert client.cmd(f"AUTH PLAIN {token}")[0] == 535
    assert client.cmd("MAIL FROM:<bob@example.test>")[0] == 530
