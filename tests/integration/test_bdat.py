"""CHUNKING / BDAT inbound (RFC 3030) against the real server, over raw sockets.

Each chunk is read by its count, never as lines; a refused BDAT still has
its chunk read, so the next command is where the client thinks it is.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.test_metrics import scrape, value
from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    empty_mailboxes,
    make_server,
    queued,
    raw,
    submission,
    wait_for,
)
from tests.support.peers import DNSMASQ, Dnsmasq
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

LIMIT = 200_000  # [limits] max_message_size for these tests
MESSAGE = b"From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: chunks\r\n\r\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = make_server(
        tmp_path_factory.mktemp("bdat"),
        limits={"max_message_size": LIMIT},
        auth={"allow_plaintext_loopback": True},
    )
    yield server
    while RawSmtp.opened:
        RawSmtp.opened.pop().close()
    server.stop()


@pytest.fixture(autouse=True)
def _clean(srv: PostofficeServer) -> None:
    empty_mailboxes(srv)


def stored(srv: PostofficeServer) -> list[bytes]:
    return [p.read_bytes() for p in srv.messages(ALICE)]


def transaction(client: RawSmtp) -> None:
    assert client.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250


def bdat(client: RawSmtp, chunk: bytes, last: bool = False) -> tuple[int, list[str]]:
    client.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
    return client.reply()


def test_chunking_is_advertised_on_every_smtp_listener(srv: PostofficeServer) -> None:
    for port in ("smtp", "submission", "submissions"):
        client = raw(srv, port, ehlo=False)
        code, lines = client.cmd("EHLO client.test")
        assert code == 250 and "CHUNKING" in lines, (port, lines)


def test_message_in_chunks_is_stored_as_data_would_store_it(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    body = MESSAGE + b"line one\r\n.a dot stays: BDAT is not dot-stuffed\r\n"
    # A CRLF split between two chunks is still one line end.
    assert bdat(client, body[:-1]) == (250, [f"2.0.0 {len(body) - 1} octets received"])
    code, lines = bdat(client, body[-1:], last=True)
    assert code == 250 and "queued as" in lines[0], lines
    (message,) = stored(srv)
    assert message.endswith(b"Subject: chunks\n\nline one\n.a dot stays: BDAT is not dot-stuffed\n")
    assert b"\r" not in message  # the Maildir form, as after DATA
    assert client.cmd("QUIT")[0] == 221


def test_pipelined_chunks_and_next_transaction(srv: PostofficeServer) -> None:
    client = raw(srv)
    parts = [MESSAGE, b"first\r\n", b"second\r\n"]
    wire = b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
    wire += b"".join(f"BDAT {len(p)}\r\n".encode() + p for p in parts)
    wire += b"BDAT 0 LAST\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n"
    wire += b"BDAT " + str(len(MESSAGE) + 4).encode() + b" LAST\r\n" + MESSAGE + b"two\n"
    wire += b"NOOP\r\n"
    client.send(wire)  # all at once (RFC 2920 with RFC 3030 §4.2)
    codes = [client.reply()[0] for _ in range(10)]
    assert codes == [250] * 10
    messages = stored(srv)
    assert len(messages) == 2
    assert any(m.endswith(b"\n\nfirst\nsecond\n") for m in messages)
    assert any(m.endswith(b"\n\ntwo\n") for m in messages)


def test_bdat_without_mail_is_refused_and_its_chunk_consumed(srv: PostofficeServer) -> None:
    client = raw(srv)
    # The chunk looks like commands; read as lines, it would send a message.
    fake = b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    code, lines = bdat(client, fake, last=True)
    assert (code, lines[0][:5]) == (503, "5.5.1")
    assert client.cmd("NOOP")[0] == 250  # the very next reply: nothing in the chunk ran
    assert client.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    code, _ = bdat(client, b"no recipients yet\r\n")
    assert code == 554
    assert client.cmd("NOOP")[0] == 250
    assert stored(srv) == []


def test_data_after_bdat_is_refused(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    assert bdat(client, MESSAGE)[0] == 250
    assert client.cmd("DATA")[0] == 503  # RFC 3030 §2: no mixing
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 503
    assert bdat(client, b"end\r\n", last=True)[0] == 250
    assert len(stored(srv)) == 1


def test_rset_between_chunks_drops_the_message(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    assert bdat(client, MESSAGE + b"half\r\n")[0] == 250
    assert client.cmd("RSET")[0] == 250
    assert bdat(client, b"rest\r\n", last=True)[0] == 503  # the transaction is gone
    assert client.cmd("NOOP")[0] == 250
    assert stored(srv) == []
    # The same after EHLO, which also ends a transaction (RFC 5321 §4.1.4).
    transaction(client)
    assert bdat(client, MESSAGE)[0] == 250
    assert client.cmd("EHLO client.test")[0] == 250
    assert bdat(client, b"rest\r\n", last=True)[0] == 503
    assert stored(srv) == []


def test_bdat_zero_last_ends_an_empty_or_chunked_message(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    assert bdat(client, b"", last=True)[0] == 250  # an empty message: headers of ours only
    transaction(client)
    assert bdat(client, MESSAGE + b"ends in CR LF split\r")[0] == 250
    assert bdat(client, b"\n")[0] == 250
    assert bdat(client, b"", last=True)[0] == 250
    messages = stored(srv)
    assert len(messages) == 2
    assert any(m.endswith(b"\n\nends in CR LF split\n") for m in messages)


def test_bare_cr_at_the_very_end_is_refused(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    assert bdat(client, MESSAGE + b"x\r")[0] == 250
    code, lines = bdat(client, b"", last=True)
    assert code == 554 and "Bare CR" in lines[0], lines
    assert stored(srv) == []


def test_chunk_split_across_many_tcp_writes(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    body = MESSAGE + b"".join(b"line %d of a dribbled chunk\r\n" % i for i in range(40))
    client.send(f"BDAT {len(body)} LAST\r\n".encode())
    for i in range(0, len(body), 7):
        client.send(body[i : i + 7])
        time.sleep(0.001)
    code, _ = client.reply()
    assert code == 250
    (message,) = stored(srv)
    assert message.endswith(b"line 39 of a dribbled chunk\n")


def test_count_shorter_than_the_content_leaves_the_rest_as_commands(
    srv: PostofficeServer,
) -> None:
    client = raw(srv)
    transaction(client)
    # The count says 5: "NOOP\r\n" after "hello" is the next command, not content.
    client.send(b"BDAT 5 LAST\r\nhelloNOOP\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 250
    (message,) = stored(srv)
    assert message.endswith(b"\nhello")


def test_count_longer_than_the_content_waits_for_it(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    client.send(b"BDAT 100 LAST\r\n" + MESSAGE + b"QUIT\r\n")  # 100 octets not yet there
    client.sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        client.reply()  # the QUIT was content: no 221
    client.sock.settimeout(10.0)
    client.send(b"x" * (100 - len(MESSAGE) - 6))
    assert client.reply()[0] == 250
    (message,) = stored(srv)
    assert message.endswith(b"\n\nQUIT\n" + b"x" * (100 - len(MESSAGE) - 6))


@pytest.mark.parametrize(
    "line", [b"BDAT\r\n", b"BDAT ten\r\n", b"BDAT 5 FIRST\r\n", b"BDAT -1\r\n"]
)
def test_unreadable_count_ends_the_session(srv: PostofficeServer, line: bytes) -> None:
    client = raw(srv)
    transaction(client)
    client.send(line + b"MAIL FROM:<a@b.test>\r\n")
    code, lines = client.reply()
    assert (code, lines[0][:5]) == (501, "5.5.4")
    assert wait_for(client.closed_by_peer, timeout=5)
    assert stored(srv) == []


def test_huge_declared_count_is_read_and_refused_never_buffered(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    size = 8 * LIMIT
    code, lines = bdat(client, (b"0123456789abcde\r\n" * (size // 17 + 1))[:size])
    assert (code, lines[0][:5]) == (552, "5.3.4")
    # The transaction failed: the client's next chunk is refused, still in step.
    assert bdat(client, b"more\r\n", last=True)[0] == 503
    assert client.cmd("NOOP")[0] == 250
    assert stored(srv) == []
    # One past the limit over two chunks: refused at the chunk that passes it.
    transaction(client)
    assert bdat(client, MESSAGE + b"x" * (LIMIT - len(MESSAGE) - 10) + b"\r\n")[0] == 250
    assert bdat(client, b"y" * 20 + b"\r\n", last=True)[0] == 552
    assert stored(srv) == []


def test_twenty_one_digit_count_is_a_syntax_error(srv: PostofficeServer) -> None:
    client = raw(srv)
    transaction(client)
    assert client.cmd("BDAT " + "9" * 21)[0] == 501


def test_dropped_mid_chunk_queues_nothing(srv: PostofficeServer, tmp_path: Path) -> None:
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd("RCPT TO:<someone@remote.test>")[0] == 250
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    client.send(b"BDAT 1000 LAST\r\n" + MESSAGE + b"half of it")
    time.sleep(0.2)
    client.close()
    assert wait_for(lambda: "after=BDAT bytes=" in srv.log(), timeout=10)
    assert queued(srv) == []
    assert not [p for p in (srv.data_dir / "queue").rglob("*") if p.is_file()]
    assert stored(srv) == []


def test_submission_over_bdat_is_queued_and_signed(srv: PostofficeServer) -> None:
    client = submission(srv)
    assert client.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    body = f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: s\r\n\r\nsubmitted\r\n".encode()
    assert bdat(client, body, last=True)[0] == 250
    (message,) = stored(srv)
    assert message.endswith(b"\n\nsubmitted\n")
    assert b"with ESMTPSA" in message
    assert "bdat=1" in srv.log()


def test_one_postoffice_relays_to_another_with_bdat(
    tmp_path: Path, require_program: Callable[[str], str]
) -> None:
    """Our client and our server over a real wire: the sender sees CHUNKING
    and sends BDAT chunks (a message larger than one queue read, 8-bit, with
    dot lines); the receiver stores exactly what was submitted."""
    require_program(DNSMASQ)
    mx = PostofficeServer(tmp_path / "mx", domains=("remote.test",), hostname="mx.remote.test")
    mx.add_user("carol@remote.test", "carol-password-1")
    mx.start()
    dns = Dnsmasq(
        tmp_path,
        mx=[("remote.test", "mx.remote.test", 10)],
        hosts={"mx.remote.test": ["127.0.0.1"]},
    ).start()
    sender = PostofficeServer(
        tmp_path / "sender",
        sections={
            "relay": {
                "mx_port": mx.ports["smtp"],
                "dns_servers": [dns.server],
                "retry_schedule": [1],
            }
        },
    )
    sender.add_user(ALICE, ALICE_PW)
    sender.start()
    try:
        text = "Gr\u00fc\u00dfe\r\n.dot line\r\n..two dots\r\n" + "filler line of text\r\n" * 20000
        client = submission(sender)
        assert client.cmd(f"MAIL FROM:<{ALICE}> BODY=8BITMIME")[0] == 250
        assert client.cmd("RCPT TO:<carol@remote.test>")[0] == 250
        body = f"From: {ALICE}\r\nTo: carol@remote.test\r\nSubject: relayed\r\n\r\n{text}".encode()
        assert bdat(client, body, last=True)[0] == 250  # BDAT in, too
        assert wait_for(lambda: len(mx.messages("carol@remote.test")) == 1, 30), sender.log()
        stored_there = mx.messages("carol@remote.test")[0].read_bytes()
        assert stored_there.endswith(text.replace("\r\n", "\n").encode())
        # Several chunks, each answered 250, and no DATA (the record is
        # written when the parked connection closes: conncache.IDLE).
        chunked = re.compile(r"smtp session mode=smtp .*\bbdat=([2-9]|\d\d+)\b")
        assert wait_for(lambda: chunked.search(mx.log()) is not None, 15), mx.log()
        assert not re.search(r"smtp session mode=smtp .*\bdata=", mx.log())
    finally:
        sender.stop()
        mx.stop()
        dns.stop()


def test_bdat_messages_are_counted_like_data_ones(srv: PostofficeServer) -> None:
    before = scrape(srv)
    client = raw(srv)
    transaction(client)
    assert bdat(client, MESSAGE)[0] == 250
    assert bdat(client, b"counted\r\n", last=True)[0] == 250
    transaction(client)
    assert bdat(client, b"z" * (LIMIT + 10))[0] == 552
    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    msgs = "postoffice_smtp_messages_total"
    assert delta(msgs, listener="smtp", result="accepted", code="250", status="2.0.0") == 1
    assert delta(msgs, listener="smtp", result="refused", code="552", status="5.3.4") == 1
    assert delta("postoffice_smtp_data_commit_seconds_count") == 1  # the 250 after LAST, timed
    received = delta("postoffice_smtp_received_bytes_total", listener="smtp")
    assert received == len(MESSAGE) - MESSAGE.count(b"\r") + len(b"counted\n")


def test_binarymime_is_neither_offered_nor_taken(srv: PostofficeServer) -> None:
    # RFC 3030 §3: BODY=BINARYMIME only where BINARYMIME is offered; it is
    # not (the Maildir and queue forms are LF text: binary would not survive).
    client = raw(srv, ehlo=False)
    code, lines = client.cmd("EHLO client.test")
    assert code == 250 and "BINARYMIME" not in lines
    code, lines = client.cmd("MAIL FROM:<sender@remote.test> BODY=BINARYMIME")
    assert (code, lines[0][:5]) == (501, "5.5.4")
