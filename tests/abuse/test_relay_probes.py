"""Open-relay probes (RFC 5321 §3.6, RFC 5068 §2) on every SMTP port, with and without AUTH.

tests/integration/test_smtp.py already refuses the classic probes on port 25
from an anonymous client.  Here: the same family on the submission ports,
before and after a login, the forms that only look local (``%`` hack, bang
paths, quoted local parts with a local domain), and the proof that nothing
reached the outbound queue.
"""

from __future__ import annotations

import pytest

from tests.support.helpers import (
    ALICE,
    BOB_PW,
    make_server,
    plain_auth,
    queued,
    raw,
    submission,
)
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.abuse

# Every one of these names a mailbox outside our domains, or tries to.
EXTERNAL = [
    "<victim@elsewhere.test>",
    "<VICTIM@ELSEWHERE.TEST>",
    "<postmaster@elsewhere.test>",
    "<victim@elsewhere.test.>",  # a trailing dot is not another domain
    "<victim@b\u00fccher.test>",
    "<@example.test:victim@elsewhere.test>",  # source route via us
    "<@example.test,@other.test:victim@elsewhere.test>",
    "<victim@[127.0.0.1]>",
    "<victim@[IPv6:::1]>",
    "<alice@example.test.elsewhere.test>",
    "<example.test@elsewhere.test>",
]
# These carry one of our domains, but ask for routing inside the local part.
LOOKS_LOCAL = [
    "<victim%elsewhere.test@example.test>",  # the % hack
    "<victim%elsewhere.test%example.test@example.test>",
    "<elsewhere.test!victim@example.test>",  # bang path
    "<elsewhere.test!victim%example.test@example.test>",
    '<"victim@elsewhere.test"@example.test>',  # quoted local part
    '<"@elsewhere.test:victim@elsewhere.test"@example.test>',
    '<"victim%elsewhere.test"@example.test>',
    "<victim@elsewhere.test@example.test>",
]


def refused(code: int) -> bool:
    return 500 <= code < 600


@pytest.mark.parametrize("rcpt", EXTERNAL + LOOKS_LOCAL)
def test_anonymous_port_25_never_relays(server: PostofficeServer, rcpt: str) -> None:
    client = raw(server)
    # A sender in our own domain earns nothing without AUTH.
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    code, lines = client.cmd(f"RCPT TO:{rcpt}".encode())
    assert refused(code), (rcpt, code, lines)
    assert client.cmd("DATA")[0] in (503, 554)
    assert queued(server) == []


@pytest.mark.parametrize("port", ["submission", "submissions"])
def test_submission_without_auth_refuses_the_transaction(
    server: PostofficeServer, port: str
) -> None:
    client = raw(server, port)
    if port == "submission":
        assert client.cmd("STARTTLS")[0] == 220
        client.starttls()
        assert client.cmd("EHLO client.test")[0] == 250
    code, lines = client.cmd(f"MAIL FROM:<{ALICE}>")
    assert code == 530 and lines[0].startswith("5.7.0")
    for rcpt in ("<victim@elsewhere.test>", "<alice@example.test>"):
        assert client.cmd(f"RCPT TO:{rcpt}")[0] == 503
    assert client.cmd("DATA")[0] == 503
    assert queued(server) == []


def test_a_failed_login_grants_nothing(server: PostofficeServer) -> None:
    client = raw(server, "submission")
    assert client.cmd("STARTTLS")[0] == 220
    client.starttls()
    assert client.cmd("EHLO client.test")[0] == 250
    assert client.cmd(f"AUTH PLAIN {plain_auth(ALICE, 'not-the-password')}")[0] == 535
    assert client.cmd(f"AUTH PLAIN {plain_auth(ALICE, BOB_PW)}")[0] == 535  # bob's password
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 530


def test_auth_on_port_25_is_not_available_and_changes_nothing(server: PostofficeServer) -> None:
    client = raw(server)
    assert client.cmd("STARTTLS")[0] == 220
    client.starttls()
    assert client.cmd("EHLO client.test")[0] == 250
    code, _ = client.cmd(f"AUTH PLAIN {plain_auth(ALICE, 'alice-password-1')}")
    assert code in (502, 503, 504)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert refused(client.cmd("RCPT TO:<victim@elsewhere.test>")[0])
    assert queued(server) == []


@pytest.mark.parametrize("rcpt", LOOKS_LOCAL)
def test_authenticated_local_part_routing_is_not_interpreted(
    server: PostofficeServer, rcpt: str
) -> None:
    # Even a user who may relay must not have "%" or "!" taken as a route:
    # the address is local (example.test) and simply has no such mailbox.
    client = submission(server)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    code, lines = client.cmd(f"RCPT TO:{rcpt}".encode())
    assert refused(code), (rcpt, code, lines)
    assert queued(server) == []


def test_address_literals_are_refused_even_after_auth(server: PostofficeServer) -> None:
    client = submission(server)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    for rcpt in ("<victim@[127.0.0.1]>", "<victim@[192.0.2.1]>", "<victim@[IPv6:::1]>"):
        code, lines = client.cmd(f"RCPT TO:{rcpt}")
        assert code == 550 and lines[0].startswith("5.1.2"), (rcpt, code, lines)
    assert queued(server) == []


def test_catch_all_does_not_turn_routing_tricks_into_relaying(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # With a catch-all, a routing trick is either refused (it is no account
    # name) or lands in the catch-all's mailbox: never in the outbound queue.
    srv = make_server(tmp_path)
    try:
        srv.cli("alias", "add", "@example.test", ALICE)
        client = raw(srv)
        assert client.cmd("MAIL FROM:<someone@remote.test>")[0] == 250
        assert client.cmd("RCPT TO:<anything@example.test>")[0] == 250  # the catch-all works
        for rcpt in LOOKS_LOCAL:
            code, lines = client.cmd(f"RCPT TO:{rcpt}".encode())
            assert code == 250 or refused(code), (rcpt, code, lines)
        assert client.cmd("DATA")[0] == 354
        assert client.cmd("Subject: tricks\r\n\r\nbody\r\n.")[0] == 250
        assert len(srv.messages(ALICE)) == 1  # one copy, in the catch-all's mailbox
        assert queued(srv) == []
    finally:
        srv.stop()


def test_every_refusal_is_logged(server: PostofficeServer) -> None:
    client = raw(server)
    client.cmd("MAIL FROM:<spammer@remote.test>")
    client.cmd("RCPT TO:<victim%elsewhere.test@example.test>")
    client.cmd("RCPT TO:<victim@elsewhere.test>")
    client.cmd("QUIT")
    log = server.log()
    for rcpt in ("victim%elsewhere.test@example.test", "victim@elsewhere.test"):
        assert f"from=<spammer@remote.test> to=<{rcpt}> result=5" in log, rcpt
