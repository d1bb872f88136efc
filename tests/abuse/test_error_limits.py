"""Enumeration and junk: errors per SMTP session are counted, slowed, then cut off.

Postfix's model (smtpd_soft_error_limit, smtpd_hard_error_limit,
smtpd_error_sleep_time): every 5xx reply, an unknown recipient included, is
an error; past ``[limits] soft_errors`` each reply waits ``error_delay``
seconds; at ``max_errors`` the session gets 421 4.7.0 right after the reply
that reached it, even in the middle of a pipelined batch, and nothing after
it is answered.  A message accepted with 250 starts the count again.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, make_server, raw
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    """Default limits (20 errors, delays after 10), with short delays."""
    srv = make_server(tmp_path_factory.mktemp("errors"), limits={"error_delay": 0.01})
    yield srv
    while RawSmtp.opened:
        RawSmtp.opened.pop().close()
    srv.stop()


def replies_until_closed(client: RawSmtp) -> list[tuple[int, list[str]]]:
    """Every reply the server sends until it closes the connection."""
    got = []
    while True:
        try:
            got.append(client.reply())
        except ConnectionError:
            return got


def test_500_pipelined_bad_commands_get_20_answers_then_421(quick: PostofficeServer) -> None:
    client = raw(quick)
    client.send(b"".join(b"BOGUS %d\r\n" % i for i in range(500)))
    got = replies_until_closed(client)
    assert [code for code, _ in got] == [500] * 20 + [421], got
    assert got[-1][1][0].startswith("4.7.0")
    assert client.closed_by_peer()


def test_rcpt_flood_to_unknown_users_is_cut_off_after_20(quick: PostofficeServer) -> None:
    client = raw(quick)
    assert client.cmd("MAIL FROM:<harvester@remote.test>")[0] == 250
    client.send(b"".join(b"RCPT TO:<guess%d@example.test>\r\n" % i for i in range(2000)))
    got = replies_until_closed(client)
    assert len(got) == 21, got
    assert all(code == 550 and lines[0].startswith("5.1.1") for code, lines in got[:20])
    assert got[20][0] == 421
    assert client.closed_by_peer()
    assert "smtp too many errors client=127.0.0.1 errors=20" in quick.log()


def test_unpipelined_probes_are_cut_off_too(quick: PostofficeServer) -> None:
    client = raw(quick)
    assert client.cmd("MAIL FROM:<harvester@remote.test>")[0] == 250
    codes = [client.cmd(f"RCPT TO:<guess{i}@example.test>")[0] for i in range(19)]
    assert codes == [550] * 19
    assert client.cmd("RCPT TO:<alice@example.test>")[0] == 250  # not an error
    assert client.cmd("RCPT TO:<relay@elsewhere.test>")[0] == 554  # the 20th
    assert client.reply()[0] == 421
    assert client.closed_by_peer()
    # The count is the session's: a new one starts from nothing.
    again = raw(quick)
    assert again.cmd("MAIL FROM:<harvester@remote.test>")[0] == 250
    assert [again.cmd(f"RCPT TO:<more{i}@example.test>")[0] for i in range(19)] == [550] * 19
    assert again.cmd("NOOP")[0] == 250


def test_a_delivered_message_starts_the_count_again(quick: PostofficeServer) -> None:
    client = raw(quick)
    assert client.cmd("MAIL FROM:<friend@remote.test>")[0] == 250
    assert [client.cmd(f"RCPT TO:<old{i}@example.test>")[0] for i in range(19)] == [550] * 19
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    assert client.cmd(b"Subject: list mail\r\n\r\nhi\r\n.")[0] == 250
    assert client.cmd("MAIL FROM:<friend@remote.test>")[0] == 250
    assert [client.cmd(f"RCPT TO:<old{i}@example.test>")[0] for i in range(19)] == [550] * 19
    assert client.cmd("NOOP")[0] == 250  # still open after 38 refusals in all
    assert client.cmd("RCPT TO:<old19@example.test>")[0] == 550
    assert client.reply()[0] == 421


def test_replies_past_the_soft_limit_are_delayed_without_blocking_others(
    tmp_path: Path,
) -> None:
    delay = 1.5
    srv = make_server(tmp_path, limits={"soft_errors": 2, "max_errors": 5, "error_delay": delay})
    try:
        client = raw(srv)
        assert [client.cmd("BOGUS")[0] for _ in range(2)] == [500, 500]
        # From now on every reply waits, a good one too.
        for command, code in (("NOOP", 250), ("BOGUS", 500)):
            started = time.monotonic()
            assert client.cmd(command)[0] == code
            # asyncio runs a timer up to its clock resolution early: allow 50 ms.
            assert time.monotonic() - started >= delay - 0.05
        # While this session waits, another one is answered.
        client.send(b"BOGUS\r\n")
        other = raw(srv)
        assert other.cmd("NOOP")[0] == 250
        waiting, _, _ = select.select([client.sock], [], [], 0)
        assert waiting == [], "the delayed reply came before the other session's"
        assert client.reply()[0] == 500  # the 4th error
        assert client.cmd("BOGUS")[0] == 500  # the 5th: the hard limit
        assert client.reply()[0] == 421
        assert client.closed_by_peer()
    finally:
        srv.stop()


def test_delays_add_up_to_at_most_the_session_timeout(tmp_path: Path) -> None:
    """The delays cannot hold a slot longer than an idle client could."""
    srv = make_server(
        tmp_path,
        limits={"soft_errors": 1, "max_errors": 100, "error_delay": 0.4, "smtp_timeout": 1.0},
    )
    try:
        client = raw(srv)
        client.send(b"BOGUS\r\n" * 10)
        got = replies_until_closed(client)
        # 1 error at once, two waits of 0.4 s; a third would pass 1.0 s.
        assert [code for code, _ in got] == [500, 500, 500, 421], got
    finally:
        srv.stop()
