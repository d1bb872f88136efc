"""Modified UTF-7 (RFC 3501 §5.1.3): the RFC's examples, refusals, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.mail.mutf7 import Mutf7Error, decode, encode


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("INBOX", "INBOX"),
        ("&", "&-"),
        ("a&b", "a&-b"),
        ("Entwürfe", "Entw&APw-rfe"),
        # RFC 3501 §5.1.3's own example
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("😀", "&2D3eAA-"),  # outside the BMP: a surrogate pair
        ("", ""),
    ],
)
def test_examples(text: str, wire: str) -> None:
    assert encode(text) == wire
    assert decode(wire) == text


@pytest.mark.parametrize(
    "wire",
    [
        "&Jjo!",  # unterminated run
        "&U,BTFw",  # no closing '-'
        "&AGE-",  # printable ASCII ("a") inside a run
        "&U,BTFw-&ZeVnLIqe-",  # two adjacent runs: one run is the canonical form
        "&U,BTF2-",  # non-zero padding bits
        "&AA-",  # half a UTF-16 unit... of a NUL
        "&2D0-",  # a lone high surrogate
        "a\x7fb",  # a control character outside a run
        "ü",  # 8-bit outside a run
        "&U/BTFw-",  # "/" is plain base64, not modified
    ],
)
def test_refuses_non_canonical(wire: str) -> None:
    with pytest.raises(Mutf7Error):
        decode(wire)


def test_lone_surrogate_has_no_encoding() -> None:
    with pytest.raises(Mutf7Error):
        encode("a\ud800")


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=200)
@given(_text)
def test_round_trip(text: str) -> None:
    wire = encode(text)
    assert wire.isascii()
    assert all(" " <= ch <= "~" for ch in wire)
    assert decode(wire) == text


@settings(max_examples=200)
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
def test_decode_accepts_only_what_encode_gives(wire: str) -> None:
    try:
        text = decode(wire)
    except Mutf7Error:
        return
    assert encode(text) == wire
