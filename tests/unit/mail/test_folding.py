"""LineFolder: lines over 998 octets folded as Postfix's smtp_line_length_limit does.

Postfix (src/smtp/smtp_proto.c, smtp_text_out) writes ``limit`` octets of a
long line, then CRLF and a SPACE that counts towards the next piece.
``reference_fold`` is that rule, one line at a time; the folder must give the
same bytes for every chunking of its input.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.mail.folding import SMTP_LINE_LIMIT, LineFolder


def fold_lines(message: bytes, limit: int = SMTP_LINE_LIMIT) -> bytes:
    """``message`` (LF form, from its first octet) folded in one feed."""
    return LineFolder(limit).feed(message)


def reference_fold(data: bytes, limit: int = SMTP_LINE_LIMIT) -> bytes:
    lines = []
    for line in data.split(b"\n"):  # the last item is an unended tail (maybe empty)
        pieces, rest = [line[:limit]], line[limit:]
        while rest:
            pieces.append(b" " + rest[: limit - 1])
            rest = rest[limit - 1 :]
        lines.append(b"\n".join(pieces))
    return b"\n".join(lines)


def feed_in(chunks: list[bytes], limit: int = SMTP_LINE_LIMIT) -> bytes:
    folder = LineFolder(limit)
    return b"".join(folder.feed(c) for c in chunks)


def test_a_2500_octet_line_becomes_three_pieces_of_at_most_998() -> None:
    line = bytes(range(33, 127)) * 26 + b"x" * 56  # 2500 octets, no spaces
    assert len(line) == 2500
    out = fold_lines(b"Subject: long\n\n" + line + b"\nend\n")
    body = out.split(b"\n\n", 1)[1].split(b"\n")
    assert body[:3] == [line[:998], b" " + line[998:1995], b" " + line[1995:]]
    assert [len(p) for p in body[:3]] == [998, 998, 506]
    assert body[3:] == [b"end", b""]


@pytest.mark.parametrize("length", [0, 1, 997, 998])
def test_lines_up_to_998_are_left_alone(length: int) -> None:
    data = b"a\n" + b"y" * length + b"\nb\n"
    folder = LineFolder()
    assert folder.feed(data) is data  # no copy either


@pytest.mark.parametrize(
    ("length", "lengths"),
    [(999, [998, 2]), (1995, [998, 998]), (1996, [998, 998, 2]), (5000, [998] * 5 + [15])],
)
def test_break_points(length: int, lengths: list[int]) -> None:
    out = fold_lines(b"z" * length + b"\n")
    pieces = out.split(b"\n")[:-1]
    assert [len(p) for p in pieces] == lengths
    assert all(p.startswith(b" ") for p in pieces[1:])
    assert b"".join(p[1:] if i else p for i, p in enumerate(pieces)) == b"z" * length


def test_no_preference_for_whitespace_like_postfix() -> None:
    # A header line with spaces is still cut at exactly 998 octets.
    line = b"To: " + b", ".join(b"user%04d@example.test" % i for i in range(60))
    out = fold_lines(line + b"\n")
    assert out == reference_fold(line + b"\n")
    assert out.split(b"\n")[0] == line[:998]


def test_an_unended_last_line_is_folded_too() -> None:
    assert fold_lines(b"q" * 1000) == b"q" * 998 + b"\n qq"
    assert fold_lines(b"q" * 998) == b"q" * 998


def test_a_line_ending_exactly_at_a_chunk_boundary() -> None:
    line = b"w" * 998
    assert feed_in([line, b"\n", b"next\n"]) == line + b"\nnext\n"
    assert feed_in([line, b"w\n"]) == line + b"\n w\n"


def test_a_long_line_fed_a_byte_at_a_time() -> None:
    data = b"h" * 3000 + b"\n"
    assert feed_in([data[i : i + 1] for i in range(len(data))]) == reference_fold(data)


# --- properties -----------------------------------------------------------------

_PIECES = [b"a", b"b", b" ", b"\n", b"\t", b"."]
texts = st.lists(st.sampled_from(_PIECES), max_size=80).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=500)
@given(text=texts, cuts=st.lists(st.integers(0, 90), max_size=8), limit=st.integers(2, 7))
def test_matches_postfix_rule_for_any_chunking(text: bytes, cuts: list[int], limit: int) -> None:
    expected = reference_fold(text, limit)
    assert feed_in(_split(text, cuts), limit) == expected
    assert all(len(line) <= limit for line in expected.split(b"\n"))
    assert fold_lines(expected, limit) == expected  # folding twice changes nothing


def test_limit_must_leave_room() -> None:
    with pytest.raises(ValueError):
        LineFolder(1)
