"""The POP3 core: transcripts per RFC section, the state table, the encoder, fuzzing."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol.errors import LocalProtocolError
from postoffice.protocol.pop3 import (
    MAX_LINE,
    NEED_DATA,
    Auth,
    AuthResponse,
    BadCommand,
    Capa,
    Dele,
    List,
    MessageEncoder,
    Noop,
    Pass,
    Pop3Server,
    Pop3State,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    capabilities,
    wire_size,
)


def events(core: Pop3Server, data: bytes) -> list[object]:
    core.receive_data(data)
    out = []
    for _ in range(1000):
        event = core.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, BadCommand):
            core.reply_err(event.reason)
        else:
            core.reply_ok()
    raise AssertionError("too many events")


def logged_in() -> Pop3Server:
    core = Pop3Server()
    core.receive_data(b"USER alice@example.test\r\nPASS pw\r\n")
    assert isinstance(core.next_event(), User)
    core.reply_ok()
    assert isinstance(core.next_event(), Pass)
    core.reply_ok()
    assert core.state is Pop3State.TRANSACTION
    return core


def one(core: Pop3Server, line: bytes) -> object:
    core.receive_data(line)
    event = core.next_event()
    assert event is not NEED_DATA
    return event


# --- RFC 1939 §4 AUTHORIZATION ---------------------------------------------------


def test_greeting_is_an_ok_line() -> None:
    assert Pop3Server().greeting("mail.example.test ready") == b"+OK mail.example.test ready\r\n"


def test_user_then_pass_carries_the_user_name_and_spaces_in_the_password() -> None:
    core = Pop3Server()
    assert one(core, b"USER alice@example.test\r\n") == User("alice@example.test")
    assert core.reply_ok("send password") == b"+OK send password\r\n"
    # RFC 1939 §7: PASS has exactly one argument, so spaces are part of it.
    assert one(core, b"PASS  my secret \r\n") == Pass("alice@example.test", " my secret ")
    core.reply_ok("logged in")
    assert core.state is Pop3State.TRANSACTION


def test_pass_without_user_is_refused() -> None:
    core = Pop3Server()
    event = one(core, b"PASS secret\r\n")
    assert isinstance(event, BadCommand)
    assert core.reply_err(event.reason).startswith(b"-ERR ")
    assert core.state is Pop3State.AUTHORIZATION


def test_failed_pass_requires_user_again() -> None:
    core = Pop3Server()
    one(core, b"USER a@b.test\r\n")
    core.reply_ok()
    one(core, b"PASS wrong\r\n")
    assert core.reply_err("bad", "AUTH") == b"-ERR [AUTH] bad\r\n"
    assert core.state is Pop3State.AUTHORIZATION
    assert isinstance(one(core, b"PASS again\r\n"), BadCommand)


def test_refused_user_forgets_the_name() -> None:
    core = Pop3Server()
    one(core, b"USER a@b.test\r\n")
    core.reply_err("plaintext refused", "AUTH")
    assert isinstance(one(core, b"PASS pw\r\n"), BadCommand)


def test_keywords_are_case_insensitive() -> None:
    core = Pop3Server()
    assert events(core, b"capa\r\nuSeR x\r\n") == [Capa(), User("x")]


def test_transaction_commands_are_refused_before_login() -> None:
    core = Pop3Server()
    for line in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"UIDL", b"TOP 1 1", b"NOOP", b"RSET"):
        event = one(core, line + b"\r\n")
        assert isinstance(event, BadCommand), line
        assert "authorization" in event.reason
        core.reply_err(event.reason)


def test_authorization_commands_are_refused_in_transaction() -> None:
    core = logged_in()
    for line in (b"USER x", b"PASS y", b"AUTH PLAIN", b"STLS"):
        event = one(core, line + b"\r\n")
        assert isinstance(event, BadCommand), line
        core.reply_err(event.reason)
    assert core.state is Pop3State.TRANSACTION


def test_apop_is_not_supported() -> None:
    event = one(Pop3Server(), b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n")
    assert isinstance(event, BadCommand) and "APOP is not supported" in event.reason


def test_unknown_and_empty_commands() -> None:
    core = Pop3Server()
    got = events(core, b"XYZZY\r\n\r\n \r\n")
    assert all(isinstance(e, BadCommand) for e in got) and len(got) == 3


def test_nul_in_a_line_is_refused() -> None:
    assert isinstance(one(Pop3Server(), b"USER a\0b\r\n"), BadCommand)


def test_bare_lf_is_tolerated() -> None:
    assert events(Pop3Server(), b"CAPA\nQUIT\n") == [Capa(), Quit()]


def test_quit_in_authorization_closes() -> None:
    core = Pop3Server()
    one(core, b"QUIT\r\n")
    assert core.reply_ok("bye") == b"+OK bye\r\n"
    assert core.state is Pop3State.CLOSED
    core.receive_data(b"NOOP\r\n")
    assert core.next_event() is NEED_DATA


# --- RFC 1939 §5 TRANSACTION --------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"STAT", Stat()),
        (b"LIST", List(None)),
        (b"LIST 3", List(3)),
        (b"UIDL", Uidl(None)),
        (b"UIDL 12", Uidl(12)),
        (b"RETR 1", Retr(1)),
        (b"DELE 2", Dele(2)),
        (b"TOP 1 0", Top(1, 0)),
        (b"TOP 4 10", Top(4, 10)),
        (b"NOOP", Noop()),
        (b"RSET", Rset()),
        (b"CAPA", Capa()),
        (b"QUIT", Quit()),
        (b"LIST 0", List(0)),  # syntactically fine; the session says "no such message"
    ],
)
def test_transaction_commands_parse(line: bytes, event: object) -> None:
    assert one(logged_in(), line + b"\r\n") == event


@pytest.mark.parametrize(
    "line",
    [b"RETR", b"RETR x", b"RETR -1", b"RETR +1", b"RETR 1 2", b"LIST 1 2", b"TOP 1",
     b"TOP 1 -1", b"STAT 1", b"DELE", b"NOOP x", b"RETR 1234567890123456789012",
     "RETR \u0661".encode()],
)  # fmt: skip
def test_malformed_arguments_are_bad_commands(line: bytes) -> None:
    assert isinstance(one(logged_in(), line + b"\r\n"), BadCommand)


def test_quit_in_transaction_closes_after_the_reply() -> None:
    core = logged_in()
    one(core, b"QUIT\r\n")
    assert core.state is Pop3State.TRANSACTION  # UPDATE is the session's to do
    core.reply_ok("done")
    assert core.state is Pop3State.CLOSED


def test_multiline_reply_dot_stuffs_and_terminates() -> None:
    core = logged_in()
    one(core, b"UIDL\r\n")
    assert core.multiline("follows", ["1 abc", ".hidden"]) == (
        b"+OK follows\r\n1 abc\r\n..hidden\r\n.\r\n"
    )


def test_replies_never_carry_line_breaks() -> None:
    core = Pop3Server()
    one(core, b"CAPA\r\n")
    assert core.reply_err("a\r\nb") == b"-ERR a  b\r\n"


def test_an_event_must_be_answered_before_the_next() -> None:
    core = Pop3Server()
    core.receive_data(b"NOOP\r\nNOOP\r\n")
    core.next_event()
    with pytest.raises(LocalProtocolError):
        core.next_event()


def test_answering_nothing_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Pop3Server().reply_ok()


def test_a_bad_command_cannot_be_answered_ok() -> None:
    core = Pop3Server()
    one(core, b"XYZ\r\n")
    with pytest.raises(LocalProtocolError):
        core.reply_ok()


# --- RFC 2449 PIPELINING and line limits --------------------------------------------


def test_pipelined_commands_come_out_in_order() -> None:
    core = logged_in()
    got = events(core, b"STAT\r\nLIST\r\nRETR 1\r\nDELE 1\r\nNOOP\r\n")
    assert got == [Stat(), List(None), Retr(1), Dele(1), Noop()]


def test_commands_split_across_reads() -> None:
    core = logged_in()
    for piece in (b"RE", b"TR", b" 1", b"\r", b"\nST", b"AT\r\n"):
        core.receive_data(piece)
    assert core.next_event() == Retr(1)
    core.reply_ok()
    assert core.next_event() == Stat()


def test_an_over_long_line_is_refused_and_skipped_without_buffering() -> None:
    core = logged_in()
    core.receive_data(b"NOOP " + b"x" * (MAX_LINE * 2))
    event = core.next_event()
    assert event is NEED_DATA  # still inside the long line
    core.receive_data(b"y" * MAX_LINE)
    assert core.next_event() is NEED_DATA
    core.receive_data(b"zz\r\nSTAT\r\n")
    event = core.next_event()
    assert isinstance(event, BadCommand) and "too long" in event.reason
    core.reply_err(event.reason)
    assert core.next_event() == Stat()


def test_a_complete_over_long_line_is_refused() -> None:
    core = logged_in()
    core.receive_data(b"NOOP " + b"x" * MAX_LINE + b"\r\nNOOP\r\n")
    assert isinstance(core.next_event(), BadCommand)
    core.reply_err("too long")
    assert core.next_event() == Noop()


# --- RFC 2595 §4 STLS ---------------------------------------------------------------


def test_stls_stops_processing_until_the_handshake() -> None:
    core = Pop3Server()
    assert one(core, b"STLS\r\n") == Stls()
    assert not core.has_buffered_data
    core.reply_ok("Begin TLS")
    assert core.state is Pop3State.TLS_PENDING
    core.receive_data(b"USER injected\r\n")  # plaintext after +OK: never processed
    assert core.next_event() is NEED_DATA
    core.tls_established()
    assert core.state is Pop3State.AUTHORIZATION
    assert one(core, b"CAPA\r\n") == Capa()


def test_stls_with_pipelined_plaintext_cannot_be_accepted() -> None:
    core = Pop3Server()
    core.receive_data(b"STLS\r\nUSER evil\r\n")
    assert core.next_event() == Stls()
    assert core.has_buffered_data
    with pytest.raises(LocalProtocolError):
        core.reply_ok("Begin TLS")


def test_stls_forgets_a_user_given_before_it() -> None:
    core = Pop3Server()
    one(core, b"USER a@b.test\r\n")
    core.reply_ok()
    one(core, b"STLS\r\n")
    core.reply_ok()
    core.tls_established()
    assert isinstance(one(core, b"PASS pw\r\n"), BadCommand)


def test_tls_established_without_stls_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Pop3Server().tls_established()


# --- RFC 5034 SASL ------------------------------------------------------------------


def test_auth_with_initial_response() -> None:
    core = Pop3Server()
    assert one(core, b"AUTH plain AGEAcHc=\r\n") == Auth("PLAIN", "AGEAcHc=")
    core.reply_ok("welcome")
    assert core.state is Pop3State.TRANSACTION


def test_auth_passes_the_equals_sign_on_as_sent() -> None:
    # "=" is an empty initial response (RFC 5034 §4): protocol/sasl.py reads it.
    assert one(Pop3Server(), b"AUTH PLAIN =\r\n") == Auth("PLAIN", "=")


def test_auth_alone_lists_mechanisms_without_logging_in() -> None:
    core = Pop3Server()
    assert one(core, b"AUTH\r\n") == Auth(None, None)
    assert core.multiline("", ["PLAIN"]) == b"+OK\r\nPLAIN\r\n.\r\n"
    assert core.state is Pop3State.AUTHORIZATION


def test_auth_continuation_then_response() -> None:
    core = Pop3Server()
    one(core, b"AUTH PLAIN\r\n")
    assert core.continuation() == b"+ \r\n"
    assert core.state is Pop3State.SASL
    # The response line is taken verbatim, even if it looks like a command.
    assert one(core, b"QUIT\r\n") == AuthResponse("QUIT")
    core.reply_err("bad", "AUTH")
    assert core.state is Pop3State.AUTHORIZATION


def test_auth_cancel_is_a_response_line_like_any_other() -> None:
    # "*" cancels (RFC 5034 §4): protocol/sasl.py reads it, as it does for SMTP.
    core = Pop3Server()
    one(core, b"AUTH PLAIN\r\n")
    core.continuation()
    assert one(core, b" * \r\n") == AuthResponse("*")
    core.reply_err("cancelled")
    assert core.state is Pop3State.AUTHORIZATION


def test_auth_two_step_exchange_and_success() -> None:
    core = Pop3Server()
    one(core, b"AUTH LOGIN\r\n")
    core.continuation("VXNlcm5hbWU6")
    assert one(core, b"YQ==\r\n") == AuthResponse("YQ==")
    assert core.continuation("UGFzc3dvcmQ6") == b"+ UGFzc3dvcmQ6\r\n"
    assert one(core, b"cHc=\r\n") == AuthResponse("cHc=")
    core.reply_ok()
    assert core.state is Pop3State.TRANSACTION


def test_over_long_sasl_response_ends_the_exchange() -> None:
    core = Pop3Server()
    one(core, b"AUTH PLAIN\r\n")
    core.continuation()
    core.receive_data(b"A" * (MAX_LINE + 10) + b"\r\n")
    event = core.next_event()
    assert isinstance(event, BadCommand)
    core.reply_err(event.reason)
    assert core.state is Pop3State.AUTHORIZATION
    assert one(core, b"CAPA\r\n") == Capa()


def test_continuation_outside_auth_is_a_local_error() -> None:
    core = Pop3Server()
    one(core, b"CAPA\r\n")
    with pytest.raises(LocalProtocolError):
        core.continuation()


# --- RFC 2449 §6 CAPA, RFC 3206 codes -------------------------------------------------


def test_capabilities_in_authorization() -> None:
    caps = capabilities(
        Pop3State.AUTHORIZATION, stls=True, sasl=("PLAIN",), implementation="postoffice"
    )
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER",
                "SASL PLAIN", "STLS", "IMPLEMENTATION postoffice"):  # fmt: skip
        assert cap in caps


def test_capabilities_hide_sasl_and_stls_when_not_usable() -> None:
    caps = capabilities(Pop3State.AUTHORIZATION, stls=False, sasl=(), implementation="x")
    assert not any(c.startswith(("SASL", "STLS")) for c in caps)
    caps = capabilities(Pop3State.TRANSACTION, stls=True, sasl=("PLAIN",), implementation="x")
    assert not any(c.startswith(("SASL", "STLS", "USER")) for c in caps)


def test_response_codes_are_bracketed() -> None:
    core = logged_in()
    one(core, b"RETR 1\r\n")
    assert core.reply_err("try later", "SYS/TEMP") == b"-ERR [SYS/TEMP] try later\r\n"


# --- the message encoder (RFC 1939 §3 byte-stuffing, §7 TOP) -------------------------


def decode_wire(wire: bytes) -> bytes:
    """What a client makes of a multi-line body: unstuffed, terminator removed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[: -len(b".\r\n")]
    lines = body.split(b"\r\n")[:-1] if body else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def encode(chunks: list[bytes], lines: int | None = None) -> bytes:
    encoder = MessageEncoder(lines)
    out = b"".join(encoder.feed(c) for c in chunks if not encoder.done)
    return out + encoder.finish()


def test_lf_message_becomes_crlf_and_dot_stuffed() -> None:
    wire = encode([b"Subject: x\n\n.starts with dot\n..two\nend\n"])
    assert wire == b"Subject: x\r\n\r\n..starts with dot\r\n...two\r\nend\r\n.\r\n"


def test_a_line_that_is_only_a_dot_cannot_end_the_message_early() -> None:
    wire = encode([b"a\n.\nb\n"])
    assert wire == b"a\r\n..\r\nb\r\n.\r\n"


def test_first_line_dot_and_dot_at_chunk_boundary() -> None:
    assert encode([b".x\n"]) == b"..x\r\n.\r\n"
    assert encode([b"a\n", b".b\n"]) == b"a\r\n..b\r\n.\r\n"


def test_crlf_split_across_chunks_is_not_doubled() -> None:
    assert encode([b"a\r", b"\nb\r\n"]) == b"a\r\nb\r\n.\r\n"
    assert encode([b"a\r", b"\r", b"\n"]) == b"a\r\r\n.\r\n"


def test_missing_final_newline_is_added() -> None:
    assert encode([b"no newline"]) == b"no newline\r\n.\r\n"
    assert encode([b"ends in cr\r"]) == b"ends in cr\r\r\n.\r\n"


def test_empty_message() -> None:
    assert encode([]) == b".\r\n"
    assert wire_size([]) == 0


def test_sizes_match_dovecot_w_rule() -> None:
    # Dovecot's W=: every LF not preceded by CR counts one more octet.
    data = b"a\nb\r\nc\n"
    assert wire_size([data]) == len(data) + 2
    assert wire_size([b"x\n" * 1000]) == 3000


def test_top_sends_header_blank_line_and_n_body_lines() -> None:
    msg = b"H: 1\nH2: 2\n\nline1\n.line2\nline3\n"
    assert encode([msg], 0) == b"H: 1\r\nH2: 2\r\n\r\n.\r\n"
    assert encode([msg], 2) == b"H: 1\r\nH2: 2\r\n\r\nline1\r\n..line2\r\n.\r\n"
    assert encode([msg], 99) == encode([msg])


def test_top_without_a_body_separator_sends_everything() -> None:
    assert encode([b"H: 1\nH: 2\n"], 0) == b"H: 1\r\nH: 2\r\n.\r\n"


def test_top_with_an_empty_header() -> None:
    assert encode([b"\nbody1\nbody2\n"], 1) == b"\r\nbody1\r\n.\r\n"


def test_top_stops_asking_for_data() -> None:
    encoder = MessageEncoder(1)
    encoder.feed(b"H: 1\n\nb1\nb2\n")
    assert encoder.done
    assert encoder.feed(b"more\n") == b""


messages = st.lists(
    st.sampled_from([b"\n", b"\r\n", b"\r", b".", b"..", b"a", b"Hdr: v", b" ", b"\n.\n"]),
    max_size=40,
).map(b"".join)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), message=messages)
def test_encoding_is_independent_of_chunking_and_round_trips(
    data: st.DataObject, message: bytes
) -> None:
    chunks = data.draw(split(message))
    wire = encode(chunks)
    assert wire == encode([message])
    decoded = decode_wire(wire)
    # What the client gets is the message with CRLF endings (plus a final CRLF).
    expected = re.sub(rb"(?<!\r)\n", b"\r\n", message)  # every bare LF becomes CRLF
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert decoded == expected
    assert len(decoded) == wire_size(chunks)  # LIST size == octets received


@settings(max_examples=300, deadline=None)
@given(data=st.data(), message=messages, lines=st.integers(0, 5))
def test_top_is_independent_of_chunking_and_a_prefix(
    data: st.DataObject, message: bytes, lines: int
) -> None:
    top = encode(data.draw(split(message)), lines)
    assert top == encode([message], lines)
    assert decode_wire(encode([message])).startswith(decode_wire(top))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_parser_never_fails_on_arbitrary_input(pieces: list[bytes]) -> None:
    core = Pop3Server(max_line=40)
    for piece in pieces:
        core.receive_data(piece)
        for _ in range(100):
            event = core.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Stls | BadCommand | Quit):
                core.reply_err("no")
            else:
                core.reply_ok()
        else:
            raise AssertionError("too many events from one piece")


# --- take_line: the fast path asks the core ---------------------------------------------


@settings(max_examples=300)
@given(line=st.binary(max_size=40) | st.sampled_from([b"RETR 1", b"retr 02", b"TOP 1 2"]))
def test_take_line_reads_a_line_as_next_event_does(line: bytes) -> None:
    """For any one whole line the fast path gets the event the ordinary way
    would give; anything else (no line end, two lines) is not taken."""
    for ending in (b"\r\n", b"\n", b""):
        data = line + ending
        ordinary = logged_in()
        ordinary.receive_data(data)
        expected = ordinary.next_event()
        core = logged_in()
        taken = core.take_line(data, lambda event: True)
        if not data or data.find(b"\n") != len(data) - 1:  # not exactly one whole line
            assert taken is None
            assert core.next_event() is NEED_DATA  # nothing consumed
        else:
            assert taken == expected
            with pytest.raises(LocalProtocolError):  # it awaits its answer
                core.next_event()


def test_take_line_refused_by_the_session_changes_nothing() -> None:
    core = logged_in()
    seen: list[object] = []
    assert core.take_line(b"RETR 3\r\n", lambda event: seen.append(event) is not None) is None
    assert seen == [Retr(3)]
    assert core.next_event() is NEED_DATA
    assert core.take_line(b"RETR 3\r\n", lambda event: True) == Retr(3)
    core.reply_ok("10 octets")
    assert core.next_event() is NEED_DATA


def test_take_line_only_with_nothing_buffered_or_awaiting_and_never_in_sasl() -> None:
    core = logged_in()
    core.receive_data(b"NOO")  # a line begun: the next input completes it
    assert core.take_line(b"RETR 1\r\n", lambda event: True) is None
    assert core.next_event() is NEED_DATA
    core.receive_data(b"P\r\n")
    assert core.next_event() == Noop()
    assert core.take_line(b"RETR 1\r\n", lambda event: True) is None  # NOOP unanswered
    core.reply_ok()
    sasl = Pop3Server()
    assert one(sasl, b"AUTH PLAIN\r\n") == Auth("PLAIN", None)
    sasl.continuation()
    assert sasl.take_line(b"RETR 1\r\n", lambda event: True) is None  # a response, not a command
    assert one(sasl, b"RETR 1\r\n") == AuthResponse("RETR 1")
