"""Sender spoofing on submission (RFC 6409 §4.1, §6.1): a user sends only as itself.

tests/integration/test_submission.py refuses another user's envelope
sender and a plain ``From: bob``.  Here: the forms a forger tries next —
case and route tricks in MAIL FROM, a second From: header, several
authors, folded and encoded headers, From: split across packets, and a
Sender: header naming someone else.
"""

from __future__ import annotations

import pytest

from tests.support.helpers import ALICE, BOB, submission
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.abuse

FORGED_ENVELOPES = [
    "<bob@example.test>",
    "<BOB@EXAMPLE.TEST>",
    "<bob+alice@example.test>",
    '<"bob"@example.test>',
    "<@example.test:bob@example.test>",
    "<alice@example.test.evil.test>",
    "<alice@[127.0.0.1]>",
    "<alice%example.test@evil.test>",
    "<>",
]
OWN_ENVELOPES = ["<alice@example.test>", "<ALICE@Example.Test>", "<alice+list@example.test>"]

FORGED_HEADERS = {
    "two-from": b"From: alice@example.test\r\nFrom: bob@example.test\r\n",
    "two-authors": b"From: alice@example.test, bob@example.test\r\n",
    "folded": b"From: Bob\r\n <bob@example.test>\r\n",
    "encoded-word": b"From: =?utf-8?q?Alice?= <bob@example.test>\r\n",
    "group": b"From: friends: bob@example.test;\r\n",
    "lower-case-name": b"from:bob@example.test\r\n",
    "upper-case-name": b"FROM: BOB@EXAMPLE.TEST\r\n",
    "comment-hides-author": b"From: (alice@example.test) bob@example.test\r\n",
    "route-addr": b"From: <@example.test:bob@example.test>\r\n",
    "sender-is-bob": b"From: alice@example.test\r\nSender: bob@example.test\r\n",
    # email.utils recursed once per "(" and the session died without a reply.
    "nested-comments": b"From: " + b"\r\n ".join([b"(" * 500] * 6) + b"bob@example.test\r\n",
}


@pytest.mark.parametrize("sender", FORGED_ENVELOPES)
def test_forged_envelope_sender_is_553(server: PostofficeServer, sender: str) -> None:
    client = submission(server)
    code, lines = client.cmd(f"MAIL FROM:{sender}")
    assert code in (501, 553), (sender, code, lines)


@pytest.mark.parametrize("sender", OWN_ENVELOPES)
def test_own_address_in_any_case_or_plus_form_is_fine(
    server: PostofficeServer, sender: str
) -> None:
    client = submission(server)
    assert client.cmd(f"MAIL FROM:{sender}")[0] == 250


def send(server: PostofficeServer, header: bytes, *, pieces: int = 1) -> int:
    client = submission(server)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    data = header + b"Subject: spoof\r\n\r\nbody\r\n.\r\n"
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        client.send(data[i : i + step])
    return client.reply()[0]


@pytest.mark.parametrize("header", FORGED_HEADERS.values(), ids=FORGED_HEADERS.keys())
def test_forged_author_headers_are_refused(server: PostofficeServer, header: bytes) -> None:
    code = send(server, header)
    assert code == 553, header
    assert server.messages(BOB) == []


@pytest.mark.parametrize("pieces", [2, 7, 40])
def test_forged_from_split_across_packets_is_refused(server: PostofficeServer, pieces: int) -> None:
    assert send(server, b"From: Bob <bob@example.test>\r\n", pieces=pieces) == 553
    assert server.messages(BOB) == []


def test_a_from_line_in_the_body_is_only_text(server: PostofficeServer) -> None:
    client = submission(server)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    msg = b"From: alice@example.test\r\n\r\nFrom: bob@example.test\r\n.\r\n"
    client.send(msg)
    assert client.reply()[0] == 250


def test_own_sender_header_is_fine(server: PostofficeServer) -> None:
    header = b"From: Alice <alice@example.test>\r\nSender: alice+bot@example.test\r\n"
    assert send(server, header) == 250
    assert len(server.messages(BOB)) == 1
