"""SMTP smuggling (CVE-2023-51764/51765/51766): every bare CR/LF end-of-data form.

Only ``<CRLF>.<CRLF>`` ends DATA (RFC 5321 §4.1.1.4).  A server that also
takes ``<LF>.<LF>`` or ``<CR>.<CR>`` lets a message carry a second,
forged transaction past the outbound MTA that relayed it.  Both roles are
tested: postoffice receiving (port 25 and submission), and postoffice as
the relay in the middle, where what it sends on must end lines only in CRLF,
so that no lenient receiver behind it can find a false end either.

tests/integration/test_smtp.py covers seven forms on port 25; the full
table (every CR/LF/CRLF pair around the dot, plus NUL and doubled forms) is
here.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest

from tests.support.helpers import ALICE, BOB, make_server, queued, raw, submission, wait_for
from tests.support.peers import ScriptedMta
from tests.support.ports import free_port
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

pytestmark = pytest.mark.abuse

ENDINGS = {"CRLF": b"\r\n", "LF": b"\n", "CR": b"\r"}
FAKE_ENDS = [
    pytest.param(ENDINGS[a] + b"." + ENDINGS[b], id=f"{a}.{b}")
    for a, b in itertools.product(ENDINGS, ENDINGS)
    if (a, b) != ("CRLF", "CRLF")
] + [
    pytest.param(b"\r\n.\x00\r\n", id="CRLF.NUL.CRLF"),
    pytest.param(b"\r\r\n.\r\r\n", id="CR.CRLF.CR.CRLF"),
    pytest.param(b"\n\n.\n\n", id="LFLF.LFLF"),
    pytest.param(b"\r\n. \r\n", id="CRLF.space.CRLF"),
    pytest.param(b"\r\n..\r\n", id="CRLF-stuffed-dot-CRLF"),
]


def smuggle(client: RawSmtp, sender: str, fake_end: bytes, victim: str) -> int:
    """One DATA whose body hides a second transaction behind ``fake_end``."""
    client.cmd(f"MAIL FROM:<{sender}>")
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(
        f"From: {sender}\r\nSubject: outer\r\n\r\nouter body".encode()
        + fake_end
        + f"MAIL FROM:<{sender}>\r\nRCPT TO:<{victim}>\r\nDATA\r\n".encode()
        + b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    return client.reply()[0]


def check_one_message_at_most(srv: PostofficeServer, client: RawSmtp, code: int) -> None:
    # One reply for the whole thing: one message (bare LF normalised) or a
    # refusal (bare CR); never a second transaction.
    assert code in (250, 554), code
    assert client.cmd("NOOP")[0] == 250  # no leftover replies queued behind it
    assert srv.messages(BOB) == []
    stored = srv.messages(ALICE)
    assert len(stored) == (1 if code == 250 else 0)
    if stored:
        content = stored[0].read_bytes()
        assert b"Subject: smuggled" in content and b"\r" not in content  # only content


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_port_25(server: PostofficeServer, fake_end: bytes) -> None:
    client = raw(server)
    code = smuggle(client, "a@remote.test", fake_end, BOB)
    check_one_message_at_most(server, client, code)


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_submission(server: PostofficeServer, fake_end: bytes) -> None:
    client = submission(server)
    code = smuggle(client, ALICE, fake_end, BOB)
    check_one_message_at_most(server, client, code)


def test_the_real_end_split_across_packets_is_still_the_end(server: PostofficeServer) -> None:
    client = raw(server)
    client.cmd("MAIL FROM:<a@remote.test>")
    client.cmd(f"RCPT TO:<{ALICE}>")
    assert client.cmd("DATA")[0] == 354
    for piece in (b"Subject: split\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
        client.send(piece)
    assert client.reply()[0] == 250
    assert len(server.messages(ALICE)) == 1


# --- postoffice as the hop in the middle --------------------------------------------


@pytest.fixture(scope="module")
def shared_relay_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PostofficeServer, ScriptedMta]]:
    """postoffice relaying everything to a scripted MTA (its smarthost)."""
    port = free_port()
    peer = ScriptedMta("127.0.0.1", port).start()
    srv = make_server(
        tmp_path_factory.mktemp("relay"),
        relay={"smarthost": f"127.0.0.1:{port}", "retry_schedule": [1]},
    )
    try:
        yield srv, peer
    finally:
        srv.stop()
        peer.stop()


@pytest.fixture
def relay_pair(
    shared_relay_pair: tuple[PostofficeServer, ScriptedMta],
) -> tuple[PostofficeServer, ScriptedMta]:
    srv, peer = shared_relay_pair
    assert wait_for(lambda: queued(srv) == [])  # the previous test's mail is gone
    peer.received.clear()
    peer.commands.clear()
    return srv, peer


def only_crlf(data: bytes) -> bool:
    bare = data.replace(b"\r\n", b"")
    return b"\r" not in bare and b"\n" not in bare


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_relayed_mail_carries_no_false_end(
    relay_pair: tuple[PostofficeServer, ScriptedMta], fake_end: bytes
) -> None:
    srv, peer = relay_pair
    client = submission(srv)
    client.cmd(f"MAIL FROM:<{ALICE}>")
    assert client.cmd("RCPT TO:<friend@remote.test>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(
        b"From: alice@example.test\r\nSubject: outer\r\n\r\nouter body"
        + fake_end
        + b"MAIL FROM:<ceo@remote.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\n"
        b"From: ceo@remote.test\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    code = client.reply()[0]
    assert code in (250, 554)
    client.cmd("QUIT")
    if code == 554:
        return  # refused at our door: nothing to relay
    assert wait_for(lambda: len(peer.received) == 1, 20)
    (got,) = peer.received
    assert got.recipients == ["<friend@remote.test>"]
    assert only_crlf(got.data), got.data  # no lenient receiver can find an end in it
    assert b"Subject: smuggled" in got.data
    # the peer saw one transaction: one MAIL, one RCPT, one DATA
    verbs = [re.split(r"[ :]", c, maxsplit=1)[0].upper() for c in peer.commands]
    assert verbs.count("MAIL") == 1 and verbs.count("RCPT") == 1 and verbs.count("DATA") == 1
