"""The FETCH structure path's shortcuts give what the general code gives:
a bare addr-spec answered without the address tokenizer, lists encoded
with NIL and plain strings inline, a body's line count kept for BODY and
BODYSTRUCTURE both."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postoffice.protocol import imap_address
from postoffice.protocol.imap_fetch import FetchMessage
from postoffice.protocol.imap_response import Atom, encode_string, encode_value

# Bytes an address field is made of, specials and white space included.
address_bytes = st.binary(max_size=40) | st.lists(
    st.sampled_from(
        [
            b"a",
            b"b.c",
            b"@",
            b".",
            b" ",
            b"\t",
            b"<",
            b">",
            b",",
            b'"',
            b"(",
            b"[",
            b"x\xc3\xa9",
            b"\\",
        ]
    ),
    max_size=12,
).map(b"".join)


@given(address_bytes)
def test_bare_address_shortcut_is_the_tokenizer_answer(value: bytes) -> None:
    assert imap_address.address_list(value) == imap_address._parsed(value)


def test_bare_address_shortcut_cases() -> None:
    for value, want in [
        (b"a@b.c", [(None, None, b"a", b"b.c")]),
        (b"  x.y@host  ", [(None, None, b"x.y", b"host")]),
        (b"a@b, c@d", [(None, None, b"a", b"b"), (None, None, b"c", b"d")]),
        (b"a.@b", [(None, None, b"a.", b"b")]),
    ]:
        assert imap_address.address_list(value) == want == imap_address._parsed(value)


def slow_encode(value: object, utf8: bool) -> bytes:
    """encode_value as it was: one call per member."""
    if isinstance(value, tuple | list):
        return b"(" + b" ".join(slow_encode(v, utf8) for v in value) + b")"
    if isinstance(value, str):
        return encode_string(value, utf8=utf8)
    return encode_value(value, utf8=utf8)  # type: ignore[arg-type]


leaf = st.none() | st.text(max_size=12) | st.integers(0, 2**40) | st.binary(max_size=8)
tree = st.recursive(leaf, lambda kids: st.lists(kids, max_size=5).map(tuple), max_leaves=30)


@given(tree, st.booleans())
def test_list_encoding_is_member_by_member(value: object, utf8: bool) -> None:
    wrapped = (value, [Atom("X"), None], 'a"b', "é" * 3, "x" * 2000)
    assert encode_value(wrapped, utf8=utf8) == slow_encode(wrapped, utf8)  # type: ignore[arg-type]


def test_line_count_is_counted_once_and_alike() -> None:
    stored = b"From: a@b\nContent-Type: message/rfc822\n\nSubject: in\n\none\ntwo\nthree"
    message = FetchMessage(stored)
    full, basic = message.bodystructure(True), message.bodystructure(False)
    assert full[9] == basic[9] == 4  # the rfc822 part's lines
    assert full[8][7] == basic[8][7] == 2  # the inner text's: a last line without LF is not one
    again = FetchMessage(stored)
    assert again.bodystructure(False) == basic and again.bodystructure(True) == full
