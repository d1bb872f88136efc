"""The one dot-stuffer: SMTP DATA (RFC 5321 §4.5.2) and POP3 RETR (RFC 1939 §3).

Edge cases of the line-ending rule (LF and CRLF end a line, a lone CR does
not), leading dots, and the property that matters: the receiver's
unstuffing gives back the message, and no line of it can end it early.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol.dotstuff import TERMINATOR, DotStuffer, dot_stuff
from postoffice.protocol.pop3 import MessageEncoder, wire_size


def encode(*chunks: bytes) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


def unstuff(wire: bytes) -> bytes:
    """What a receiver makes of the stream: lines split on CRLF only, one
    leading dot removed, the terminator line the first line that is "."."""
    lines = wire.split(b"\r\n")
    assert lines[-1] == b"", "the stream ends with CRLF"
    end = lines.index(b".")
    assert end == len(lines) - 2, "the first lone dot is the terminator"
    return b"".join((line[1:] if line[:1] == b"." else line) + b"\r\n" for line in lines[:end])


# --- dot_stuff, the pure function ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "at_line_start", "expected"),
    [
        (b"", True, b""),
        (b".", True, b".."),
        (b".", False, b"."),  # the middle of a line
        (b"a.b\r\n", True, b"a.b\r\n"),
        (b"a\r\n.b\r\n..c\r\n.\r\n", True, b"a\r\n..b\r\n...c\r\n..\r\n"),
        (b"a\r.b", True, b"a\r.b"),  # a lone CR ends no line
        (b"a\n.b", True, b"a\n.b"),  # nor does a lone LF: to_crlf comes first
    ],
)
def test_dot_stuff(data: bytes, at_line_start: bool, expected: bytes) -> None:
    assert dot_stuff(data, at_line_start) == expected


def test_dot_stuff_does_not_copy_what_needs_no_stuffing() -> None:
    data = b"plain line\r\n" * 100
    assert dot_stuff(data, True) is data


# --- the line-ending rule -----------------------------------------------------------


def test_empty_body_is_only_the_terminator() -> None:
    assert encode() == TERMINATOR == b".\r\n"
    assert encode(b"", b"") == b".\r\n"
    assert wire_size([]) == 0


def test_lone_lf_becomes_crlf() -> None:
    assert encode(b"a\nb\n") == b"a\r\nb\r\n.\r\n"


def test_crlf_stays_crlf_and_is_never_doubled() -> None:
    assert encode(b"a\r\nb\r\n") == b"a\r\nb\r\n.\r\n"
    assert encode(b"a\r", b"\nb") == b"a\r\nb\r\n.\r\n"  # split between CR and LF


def test_lone_cr_goes_out_as_it_is() -> None:
    assert encode(b"a\rb\n") == b"a\rb\r\n.\r\n"
    assert encode(b"a\r", b"b\n") == b"a\rb\r\n.\r\n"  # a held CR with no LF after it
    assert encode(b"a\r", b"\r", b"\n") == b"a\r\r\n.\r\n"  # CR, then CRLF
    assert encode(b"ends in cr\r") == b"ends in cr\r\r\n.\r\n"


def test_a_dot_after_a_lone_cr_is_not_a_line_start() -> None:
    assert encode(b"a\r.b\n") == b"a\r.b\r\n.\r\n"
    assert encode(b"a\r", b".b\n") == b"a\r.b\r\n.\r\n"
    # "\r.\r" is no end of data for a strict receiver, and we never send a line
    # that is only "." (see the property test below).
    assert unstuff(encode(b"x\r.\r\ny\n")) == b"x\r.\r\ny\r\n"


def test_missing_final_newline_is_added() -> None:
    assert encode(b"no newline") == b"no newline\r\n.\r\n"


# --- leading dots -------------------------------------------------------------------


def test_leading_dot_at_the_start() -> None:
    assert encode(b".x\n") == b"..x\r\n.\r\n"
    assert encode(b".") == b"..\r\n.\r\n"


def test_leading_dot_after_crlf_and_lf() -> None:
    assert encode(b"a\r\n.b\n") == b"a\r\n..b\r\n.\r\n"
    assert encode(b"a\n.b\n") == b"a\r\n..b\r\n.\r\n"
    assert encode(b"a\n", b".b\n") == b"a\r\n..b\r\n.\r\n"  # at a chunk boundary
    assert encode(b"a\r", b"\n.b\n") == b"a\r\n..b\r\n.\r\n"  # CR | LF "."


def test_a_bare_dot_line_cannot_end_the_message_early() -> None:
    assert encode(b"a\n.\nb\n") == b"a\r\n..\r\nb\r\n.\r\n"
    assert encode(b".\n") == b"..\r\n.\r\n"
    assert encode(b"a\r\n.\r\n") == b"a\r\n..\r\n.\r\n"


def test_dots_inside_a_line_are_left_alone() -> None:
    assert encode(b"mid.dle ..two\n") == b"mid.dle ..two\r\n.\r\n"


def test_the_old_smtp_encoders_example() -> None:
    wire = encode(b".starts\nmid.dle\n..two\n.", b"\nend")
    assert wire == b"..starts\r\nmid.dle\r\n...two\r\n..\r\nend\r\n.\r\n"


# --- properties ---------------------------------------------------------------------

pieces = st.lists(
    st.sampled_from([b"\n", b"\r\n", b"\r", b".", b"..", b"a", b"Hdr: v", b" ", b"\n.\n"]),
    max_size=40,
).map(b"".join)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), message=pieces)
def test_any_chunking_gives_the_same_wire_and_unstuffs_to_the_message(
    data: st.DataObject, message: bytes
) -> None:
    chunks = data.draw(split(message))
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()
    assert wire == encode(message)
    expected = re.sub(rb"(?<!\r)\n", b"\r\n", message)  # every bare LF becomes CRLF
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(wire) == expected  # also: the terminator comes only at the end
    assert stuffer.unstuffed == len(expected) == wire_size(chunks)
    # POP3's RETR sends exactly what SMTP's DATA sends.
    retr = MessageEncoder()
    assert b"".join(retr.feed(c) for c in chunks) + retr.finish() == wire


@given(st.lists(st.binary(max_size=40), max_size=12))
def test_arbitrary_bytes_never_end_early(chunks: list[bytes]) -> None:
    unstuff(encode(*chunks))
