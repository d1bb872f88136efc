"""PostgreSQL restarted under two running nodes: they keep serving logins
from what they last read, and take up changes again by themselves."""

from __future__ import annotations

import imaplib
import poplib

import pytest

from tests.support.cluster import ALICE, ALICE_PW, PROPAGATION, first_success, pop3_login
from tests.support.postgres import PostgresServer
from tests.support.server import PostofficeServer

RECOVERY = 15.0  # seconds: the listener's reconnect backoff is at most 10 s


def test_nodes_ride_out_a_postgresql_restart(
    two_nodes: tuple[PostofficeServer, ...], postgres: PostgresServer
) -> None:
    node1, node2 = two_nodes
    node1.add_user(ALICE, ALICE_PW)
    assert first_success(lambda: pop3_login(node2, ALICE, ALICE_PW), PROPAGATION) is not None
    postgres.halt()
    try:
        for node in two_nodes:
            # Accounts come from memory: an IMAP login needs no database ...
            with imaplib.IMAP4("127.0.0.1", node.ports["imap"], timeout=15) as imap:
                assert imap.login(ALICE, ALICE_PW)[0] == "OK"
            # ... the POP3 maildrop lock does: try again later, not "wrong password".
            pop3 = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
            try:
                pop3.user(ALICE)
                with pytest.raises(poplib.error_proto) as info:
                    pop3.pass_(ALICE_PW)
                assert info.value.args[0].startswith(b"-ERR [SYS/TEMP]")
            finally:
                pop3.quit()
            assert node.cli("user", "list", check=False).returncode != 0  # the CLI asks it
    finally:
        postgres.resume()
    # Back: the POP3 lock connection is made again on first use ...
    assert first_success(lambda: pop3_login(node1, ALICE, ALICE_PW), 5.0) is not None
    # ... and a change made now reaches both nodes once their listeners are back.
    node1.cli("user", "passwd", ALICE, "--password-stdin", input="after-restart-pw\n")
    for node in two_nodes:
        assert first_success(lambda n=node: pop3_login(n, ALICE, "after-restart-pw"), RECOVERY)
    for node in two_nodes:
        assert "lost the [cluster] database" in node.log()
        assert "[cluster] database reachable again" in node.log()
