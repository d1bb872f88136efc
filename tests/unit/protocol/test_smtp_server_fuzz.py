"""Property-based fuzzing of the SMTP server core's command sequencing (RFC 5321 §4.1.4).

tests/unit/protocol/test_smtp_server.py already checks that any split of the
input gives the same events and that random bytes only give events.  Here a
random session — real commands with hostile arguments, garbage lines,
message content with every CR/LF/dot combination — is answered by a session
that accepts or refuses each event at random, and the core must keep the
sequence a server relies on: no recipient without an accepted sender, no
message without an accepted recipient, content only between an accepted
DATA and its end, one reply per event, and replies that are well-formed
lines.  The number of examples comes from ``POSTOFFICE_FUZZ_EXAMPLES``
(see README, "Test groups").
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from postoffice.protocol.smtp_reply import Reply
from postoffice.protocol.smtp_server import (
    Auth,
    AuthResponse,
    ChunkComplete,
    ChunkStart,
    DataChunk,
    DataComplete,
    DataRequested,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    Rejected,
    Reset,
    SmtpServerCore,
    StartTls,
)

EXAMPLES = int(os.environ.get("POSTOFFICE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_ODD = st.sampled_from(["", " ", "\t", "\r", "\n", "\x00", "<", ">", "@", ":", ",", '"', "\\",
                        ".", "..", "%", "!", "\u00e9", "\u2028", "=", "x" * 300])  # fmt: skip
_ARG = st.lists(st.one_of(_ODD, st.from_regex(r"[a-z0-9.@<>=-]{0,12}", fullmatch=True)),
                max_size=6).map("".join)  # fmt: skip
_COMMAND = st.one_of(
    st.sampled_from(
        [
            "EHLO c.test",
            "HELO c.test",
            "MAIL FROM:<a@b.test>",
            "MAIL FROM:<>",
            "MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME",
            "RCPT TO:<c@d.test>",
            "RCPT TO:<postmaster>",
            "DATA",
            "RSET",
            "NOOP",
            "QUIT",
            "VRFY x",
            "HELP",
            "STARTTLS",
            "AUTH PLAIN",
            "AUTH LOGIN",
            "AUTH PLAIN AGFAAGI=",
            "*",
            "BDAT 10",
            "BDAT 3 LAST",
            "BDAT 0 LAST",
            "mail from:<a@b.test>",
            "rcpt to: <c@d.test>",
            "EHLO",
            "MAIL",
            "RCPT",
        ]
    ),
    st.builds(
        lambda verb, arg: f"{verb} {arg}",
        st.sampled_from(["EHLO", "MAIL FROM:", "RCPT TO:", "AUTH", "VRFY", "NOOP"]),
        _ARG,
    ),
)
_CONTENT = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"Subject: s", b" ", b"\x00",
                     b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\xff"]),
    max_size=30,
).map(b"".join)  # fmt: skip
_LINE_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@st.composite
def transaction(draw: st.DrawFn) -> bytes:
    """A mostly proper transaction, with hostile pieces mixed in."""
    lines = [b"EHLO c.test\r\n"] if draw(st.booleans()) else []
    lines.append(b"MAIL FROM:<a@b.test>\r\n")
    lines += [b"RCPT TO:<c@d.test>\r\n"] * draw(st.integers(0, 3))
    lines.append(b"DATA\r\n")
    lines.append(draw(_CONTENT) + draw(st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b""])))
    for _ in range(draw(st.integers(0, 2))):  # hostile pieces anywhere
        where = draw(st.integers(0, len(lines)))
        lines.insert(where, draw(_COMMAND).encode("utf-8") + draw(_LINE_ENDS))
    return b"".join(lines)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 9))
        if kind < 4:
            out += draw(transaction())
        elif kind == 4:
            out += draw(_CONTENT) + draw(st.sampled_from([b"\r\n.\r\n", b""]))
        elif kind == 5:
            out += draw(st.binary(max_size=40))
        else:
            out += draw(_COMMAND).encode("utf-8") + draw(_LINE_ENDS)
    return bytes(out)


REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")


def random_answer(event: object, accept: bool) -> Reply:
    """A session that accepts or refuses each event as told (never TLS)."""
    match event:
        case Rejected(reply=reply):
            return reply
        case StartTls():
            return Reply(454, "TLS not available", "4.7.0")
        case Quit():
            return Reply(221, "Bye", "2.0.0")
        case DataRequested():
            return Reply(354, "Go ahead") if accept else Reply(554, "No", "5.5.1")
        case Auth(initial_response=None):
            return Reply(334, "") if accept else Reply(504, "No", "5.5.4")
        case Auth() | AuthResponse():
            return Reply(235, "Ok", "2.7.0") if accept else Reply(535, "No", "5.7.8")
        case MailFrom() | RcptTo() | DataComplete() | ChunkComplete():
            return Reply(250, "Ok", "2.0.0") if accept else Reply(550, "No", "5.7.1")
    return Reply(250, "Ok", "2.0.0")


@FUZZ
@given(data=sessions(), choices=st.lists(st.booleans(), min_size=1, max_size=64))
def test_sequence_rules_hold_whatever_the_client_sends(data: bytes, choices: list[bool]) -> None:
    core = SmtpServerCore(max_message_size=2000)
    greeted = mail = in_data = in_chunk = False
    recipients = 0
    replies = 0
    output = bytearray()
    core.receive_data(data)
    for step in range(2000):  # bounded: a session of at most a few hundred events
        event = core.next_event()
        if event is None:
            break
        if isinstance(event, ChunkStart):
            assert mail and recipients > 0 and not in_data, "BDAT without a recipient"
            in_chunk = True
            continue
        if isinstance(event, DataChunk):
            assert in_data or in_chunk, "content outside DATA and BDAT"
            continue
        reply = random_answer(event, choices[step % len(choices)])
        output += core.send(reply)
        replies += 1
        accepted = reply.code < 400
        match event:
            case Hello():
                greeted, mail, recipients = True, False, 0
                assert not in_data
            case MailFrom():
                assert greeted and not mail and not in_data, "MAIL out of sequence"
                mail = accepted
            case RcptTo():
                assert mail and not in_data, "RCPT without an accepted MAIL"
                recipients += accepted
            case DataRequested():
                assert mail and recipients > 0 and not in_data, "DATA without a recipient"
                in_data = reply.code == 354
            case DataComplete():
                assert in_data, "end of data without DATA"
                in_data, mail, recipients = False, False, 0
            case ChunkComplete():
                assert in_chunk, "end of a chunk without BDAT"
                in_chunk = False
                if event.last or not accepted:
                    mail, recipients = False, 0
            case Reset():
                assert not in_data
                mail, recipients = False, 0
        if core.closed:
            break
    else:
        raise AssertionError("the core never ran out of events")
    # One reply per answered event, each a well-formed CRLF-terminated line.
    assert b"".join(REPLY_LINE.findall(bytes(output))) == bytes(output)
    finals = [line for line in REPLY_LINE.findall(bytes(output)) if line[3:4] == b" "]
    assert len(finals) == replies


@FUZZ
@given(body=_CONTENT)
def test_only_crlf_dot_crlf_ends_a_message(body: bytes) -> None:
    # Whatever the content, exactly one message ends at the real terminator
    # and the command after it is a command (RFC 5321 §4.1.1.4, §2.3.8).
    wire = b"\r\n" + body + b"\r\n.\r\n"  # from the CRLF that ends "DATA"
    assume(wire.find(b"\r\n.\r\n") == len(body) + 2)  # no real end inside the content
    core = SmtpServerCore(max_message_size=100_000)
    core.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    core.receive_data(body + b"\r\n.\r\nNOOP\r\n")
    completes, after = 0, []
    for _ in range(200):
        event = core.next_event()
        if event is None:
            break
        if isinstance(event, DataChunk):
            continue
        if isinstance(event, DataComplete):
            completes += 1
        elif completes:
            after.append(type(event).__name__)
        core.send(random_answer(event, True))
    assert completes == 1
    assert after == ["Noop"]
