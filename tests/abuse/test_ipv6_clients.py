"""An IPv6 client is counted by its /64: rotating source addresses within it gains nothing.

A host usually holds a whole /64 and may send from any of its 2^64
addresses (RFC 6177 §2, RFC 8981 temporary addresses), so the connection
cap and the login throttle count IPv6 clients per /64 (policy/clients.py).
These tests run the server and its clients in a network namespace of their
own (tests/support/netns.py) whose loopback carries addresses of two
documentation prefixes (RFC 3849): 2001:db8:1:2::/64, where the server and
the "rotating" client live, and 2001:db8:1:3::/64, another client.
"""

from __future__ import annotations

import os
import poplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, ALICE_PW, BOB, BOB_PW, Pop3From, plain_auth
from tests.support.netns import NamespaceUnavailable, private_network
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse

SERVER = "2001:db8:1:2::1"
ROTATING = [f"2001:db8:1:2::{n:x}" for n in range(0x10, 0x50)]  # one client, one /64
OTHER = ["2001:db8:1:3::10", "2001:db8:1:3::11"]  # another client
PER_IP = 3
ADDRESS_BUDGET = 30  # [auth] throttle_address_failures, default


@pytest.fixture
def v6_server(tmp_path: Path, require_program: Callable[[str], str]) -> Iterator[PostofficeServer]:
    ip = require_program("ip")
    addresses = [f"{a}/64" for a in (SERVER, *ROTATING, *OTHER)]
    try:
        with private_network(ip, addresses):
            srv = PostofficeServer(
                tmp_path,
                host=SERVER,
                sections={
                    "limits": {"max_connections_per_ip": PER_IP},
                    "auth": {"throttle_after": 2, "throttle_max_delay": 2.0},
                },
            )
            srv.add_user(ALICE, ALICE_PW)
            srv.add_user(BOB, BOB_PW)
            srv.start()
            try:
                yield srv
            finally:
                while RawSmtp.opened:
                    RawSmtp.opened.pop().close()
                srv.stop()
    except NamespaceUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot make a network namespace: {exc}")
        pytest.skip(f"cannot make a network namespace: {exc}")


def connect(srv: PostofficeServer, source: str, port: str = "smtp") -> RawSmtp:
    return RawSmtp(srv.host, srv.ports[port], source=source)


def test_connections_from_one_64_share_the_per_address_cap(v6_server: PostofficeServer) -> None:
    held = [connect(v6_server, source) for source in ROTATING[:PER_IP]]
    for client in held:
        assert client.reply()[0] == 220
    # A fourth address of the same /64 is the same client: over the cap.
    over = connect(v6_server, ROTATING[PER_IP])
    code, lines = over.reply()
    assert code == 421, lines
    assert over.closed_by_peer()
    # Another /64 is another client.
    assert connect(v6_server, OTHER[0]).reply()[0] == 220
    # A closed connection frees its place for any address of the /64.
    held.pop().close()
    deadline = time.monotonic() + 5
    while True:
        again = connect(v6_server, ROTATING[-1])
        code, _ = again.reply()
        if code == 220 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert code == 220
    assert "refused 2001:db8:1:2::13: too many connections" in v6_server.log()


def auth_from(srv: PostofficeServer, source: str, user: str, password: str) -> tuple[int, str]:
    client = RawSmtp(srv.host, srv.ports["submissions"], source=source, timeout=30)
    client.starttls()
    assert client.reply()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    code, lines = client.cmd(f"AUTH PLAIN {plain_auth(user, password)}")
    client.close()
    return code, lines[-1]


def test_guessing_from_rotating_addresses_of_one_64_meets_one_address_budget(
    v6_server: PostofficeServer,
) -> None:
    # bob's phone changes its temporary address all the time, in his /64.
    assert auth_from(v6_server, ROTATING[0], BOB, BOB_PW)[0] == 235
    # Every guess from a fresh address of the /64, at a fresh name.
    codes = [
        auth_from(v6_server, ROTATING[1 + n], f"user{n}@example.test", "guess")[0]
        for n in range(ADDRESS_BUDGET + 3)
    ]
    assert codes == [535] * ADDRESS_BUDGET + [454] * 3, codes  # one budget for the /64
    pop = Pop3From(v6_server.host, v6_server.ports["pop3s"], ROTATING[-1])
    try:
        pop.user("someone@example.test")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            pop.pass_("guess")
    finally:
        pop.close()
    log = v6_server.log()
    assert log.count("auth throttle: address budget spent client=2001:db8:1:2::/64") == 1
    # bob, from yet another address of his /64: still known-good, in at once.
    assert auth_from(v6_server, ROTATING[-2], BOB, BOB_PW)[0] == 235
    # Another /64 has a budget of its own.
    assert auth_from(v6_server, OTHER[1], ALICE, ALICE_PW)[0] == 235
