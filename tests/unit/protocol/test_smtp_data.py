"""DataDecoder: end of data, smuggling, dot-stuffing, line endings, limits.

RFC 5321 §4.1.1.4 (DATA), §4.5.2 (transparency), §2.3.8 (line endings),
RFC 5322 §2.1.1 (line length), RFC 1870 (size).  The property tests compare
the decoder with ``reference_decode``, a byte-by-byte implementation that
is slow but obviously right.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol.smtp_data import DataDecoder

END = b"\r\n.\r\n"


@dataclass
class Decoded:
    content: bytes
    rest: bytes | None
    size: int = 0
    bare_cr: bool = False
    bare_lf: bool = False
    line_too_long: bool = False
    oversize: bool = False


def reference_decode(stream: bytes, max_size: int = 10**9, max_line: int = 998) -> Decoded:
    """What the decoder must do, one byte and one line at a time."""
    s = b"\r\n" + stream  # the CRLF that ended the DATA command
    end = s.find(END)
    if end < 0:
        return Decoded(b"", None)
    raw, rest = s[2 : end + 2], s[end + 5 :]
    result = Decoded(b"", rest)
    lines: list[bytes] = []
    line = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i : i + 1]
        if byte == b"\r" and raw[i + 1 : i + 2] == b"\n":
            lines.append(bytes(line))
            line.clear()
            i += 2
            continue
        if byte == b"\n":
            result.bare_lf = True
            lines.append(bytes(line))
            line.clear()
        else:
            if byte == b"\r":
                result.bare_cr = True
            line += byte
        i += 1
    assert not line  # the content always ends with a line ending
    out = bytearray()
    for text in lines:
        if text.startswith(b"."):
            text = text[1:]
        if len(text) > max_line:
            result.line_too_long = True
        out += text + b"\n"
    result.size = len(out)
    result.oversize = len(out) > max_size
    result.content = bytes(out[:max_size])
    return result


def decode(chunks: list[bytes], max_size: int = 10**9, max_line: int = 998) -> Decoded:
    """Feed ``chunks`` until the end; later chunks are part of the remainder."""
    decoder = DataDecoder(max_size, max_line)
    out = bytearray()
    rest: bytes | None = None
    for i, chunk in enumerate(chunks):
        content, rest = decoder.feed(chunk)
        out += content
        if rest is not None:
            rest += b"".join(chunks[i + 1 :])
            break
    return Decoded(
        bytes(out),
        rest,
        decoder.size,
        decoder.bare_cr,
        decoder.bare_lf,
        decoder.line_too_long,
        decoder.oversize,
    )


def decode_all_splits(stream: bytes, max_size: int = 10**9, max_line: int = 998) -> Decoded:
    """Decode whole, then byte by byte; both must agree."""
    whole = decode([stream], max_size, max_line)
    bytewise = decode([stream[i : i + 1] for i in range(len(stream))], max_size, max_line)
    assert bytewise == whole
    return whole


# --- RFC 5321 §4.1.1.4: the end of data ------------------------------------------


def test_simple_message() -> None:
    d = decode_all_splits(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert d.content == b"Subject: hi\n\nbody\n"
    assert d.rest == b""
    assert d.size == len(d.content)
    assert not (d.bare_cr or d.bare_lf or d.line_too_long or d.oversize)


def test_empty_message_ends_at_once() -> None:
    """The CRLF of the DATA line counts: ".\\r\\n" at once is an empty message."""
    d = decode_all_splits(b".\r\n")
    assert d.content == b""
    assert d.rest == b""
    assert d.size == 0


def test_remainder_is_returned_for_pipelined_commands() -> None:
    d = decode([b"a\r\n.\r\nQUIT\r\n"])
    assert d.content == b"a\n"
    assert d.rest == b"QUIT\r\n"


def test_not_ended_returns_none() -> None:
    decoder = DataDecoder(1000)
    assert decoder.feed(b"abc\r\n") == (b"abc", None)
    assert decoder.feed(b"def\r\n.") == (b"\ndef", None)
    assert decoder.feed(b"\r\n") == (b"\n", b"")
    assert decoder.done


def test_feed_after_end_returns_everything_as_rest() -> None:
    decoder = DataDecoder(1000)
    decoder.feed(b".\r\n")
    assert decoder.feed(b"NOOP\r\n") == (b"", b"NOOP\r\n")


def test_terminator_split_at_every_position() -> None:
    stream = b"line one\r\nline two\r\n.\r\nRSET\r\n"
    expected = reference_decode(stream)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert decode([stream[:i], stream[i:j], stream[j:]]) == expected, (i, j)


def test_only_a_few_bytes_are_held_back() -> None:
    decoder = DataDecoder(1000)
    content, _ = decoder.feed(b"abc\r\n.\r")
    assert content == b"abc"  # "\r\n.\r" is held: it may be the end


# --- SMTP smuggling: nothing but CRLF.CRLF ends the data -------------------------

SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\r.\n",
    b"\n.\r",
    b"\r\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n .\r\n",
    b"\r\n.\n\r\n",
]


@pytest.mark.abuse
@pytest.mark.parametrize("fake_end", SMUGGLING)
def test_smuggling_variants_never_end_data(fake_end: bytes) -> None:
    """CVE-2023-51764 family: a fake end followed by a smuggled transaction."""
    smuggled = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    stream = b"Subject: x\r\n\r\nhello" + fake_end + smuggled + b"evil\r\n.\r\nQUIT\r\n"
    d = decode_all_splits(stream)
    assert d.rest == b"QUIT\r\n"
    assert b"MAIL FROM:<evil@example.net>" in d.content
    assert d == reference_decode(stream)


@pytest.mark.abuse
@pytest.mark.parametrize("fake_end", [b".\n", b".\r", b"\n.\n", b".\r\r\n"])
def test_smuggling_right_at_the_start(fake_end: bytes) -> None:
    d = decode_all_splits(fake_end + b"MAIL FROM:<x@y.z>\r\n.\r\n")
    assert d.rest == b""
    assert b"MAIL FROM" in d.content


@pytest.mark.abuse
def test_bare_lf_and_bare_cr_are_flagged() -> None:
    assert decode_all_splits(b"a\nb\r\n.\r\n").bare_lf
    assert not decode_all_splits(b"a\nb\r\n.\r\n").bare_cr
    d = decode_all_splits(b"a\rb\r\n.\r\n")
    assert d.bare_cr and not d.bare_lf
    assert d.content == b"a\rb\n"


def test_bare_lf_is_a_line_ending() -> None:
    d = decode_all_splits(b"one\ntwo\r\n.\r\n")
    assert d.content == b"one\ntwo\n"


def test_cr_before_crlf_is_a_bare_cr() -> None:
    d = decode_all_splits(b"x\r\r\n.\r\n")
    assert d.bare_cr
    assert d.content == b"x\r\n"


# --- RFC 5321 §4.5.2: transparency -----------------------------------------------


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"..\r\n.\r\n", b".\n"),
        (b"...\r\n.\r\n", b"..\n"),
        (b"a\r\n..b\r\n.\r\n", b"a\n.b\n"),
        (b".a\r\n.b\r\n.\r\n", b"a\nb\n"),
        (b"a.\r\nb. .\r\n.\r\n", b"a.\nb. .\n"),  # only a leading dot goes
        (b"a\n.b\r\n.\r\n", b"a\nb\n"),  # after a bare LF too
        (b"a\r.b\r\n.\r\n", b"a\r.b\n"),  # a bare CR ends no line
        (b"\r\n..\r\n\r\n.\r\n", b"\n.\n\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, content: bytes) -> None:
    assert decode_all_splits(wire).content == content


def test_dot_line_split_across_feeds() -> None:
    decoder = DataDecoder(1000)
    out = bytearray()
    for chunk in (b"a\r\n", b".", b".b\r\n", b".", b"\r", b"\n"):
        content, rest = decoder.feed(chunk)
        out += content
    assert bytes(out) == b"a\n.b\n"
    assert rest == b""


# --- limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line_len", "too_long"), [(997, False), (998, False), (999, True), (5000, True)]
)
def test_line_length_limit(line_len: int, too_long: bool) -> None:
    stream = b"a\r\n" + b"x" * line_len + b"\r\nb\r\n.\r\n"
    assert decode_all_splits(stream).line_too_long is too_long


def test_line_length_counts_after_unstuffing() -> None:
    assert not decode([b"." + b"x" * 998 + b"\r\n.\r\n"]).line_too_long
    assert decode([b"." + b"x" * 999 + b"\r\n.\r\n"]).line_too_long


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_long_line_anywhere(position: str) -> None:
    short = b"y" * 70 + b"\r\n"
    long = b"x" * 1500 + b"\r\n"
    lines = [short] * 40
    lines.insert({"first": 0, "middle": 20, "last": 40}[position], long)
    stream = b"".join(lines) + b".\r\n"
    for size in (1, 7, 100, 1000, 4096, len(stream)):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert decode(chunks).line_too_long, size


def test_line_limit_is_configurable() -> None:
    assert decode([b"abcdef\r\n.\r\n"], max_line=5).line_too_long
    assert not decode([b"abcde\r\n.\r\n"], max_line=5).line_too_long


def test_huge_line_without_newline_in_bounded_memory() -> None:
    decoder = DataDecoder(max_size=1000)
    for _ in range(200):
        content, rest = decoder.feed(b"z" * 65536)
        assert rest is None
        assert len(content) <= 1000
        assert len(decoder._tail) <= 4
    assert decoder.oversize and decoder.line_too_long
    content, rest = decoder.feed(b"\r\n.\r\nQUIT\r\n")
    assert (content, rest) == (b"", b"QUIT\r\n")
    assert decoder.size == 200 * 65536 + 1


def test_size_limit_exact() -> None:
    d = decode([b"12345\r\n.\r\n"], max_size=6)  # "12345\n" is 6 octets
    assert (d.content, d.oversize, d.size) == (b"12345\n", False, 6)


def test_oversize_stops_output_but_consumes_to_the_end() -> None:
    stream = b"".join(b"%05d\r\n" % i for i in range(1000)) + b".\r\nQUIT\r\n"
    d = decode_all_splits(stream, max_size=100)
    assert d.oversize
    assert len(d.content) == 100
    assert d.size == 6000
    assert d.rest == b"QUIT\r\n"


def test_oversize_counts_decoded_octets() -> None:
    # 100 lines of "..x\r\n" decode to ".x\n": 300 octets, not 500.
    d = decode([b"..x\r\n" * 100 + b".\r\n"], max_size=300)
    assert not d.oversize
    assert d.size == 300


def test_big_feed_without_end() -> None:
    body = b"x" * 70 + b"\r\n"
    decoder = DataDecoder(10**9)
    content, rest = decoder.feed(body * 3000)
    assert rest is None
    assert content == b"x" * 70 + (b"\n" + b"x" * 70) * 2999
    assert decoder.feed(b".\r\n") == (b"\n", b"")


def test_big_feed_is_sliced_correctly() -> None:
    body = b"".join(b"line %d ..\r\n.%d\r\n" % (i, i) for i in range(20000))
    stream = body + b".\r\nNOOP\r\n"
    assert len(stream) > 3 * 65536
    assert decode([stream]) == reference_decode(stream)


# --- properties -----------------------------------------------------------------

# Text rich in the bytes that matter, so terminators and tricks are common.
_ALPHABET = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"\x00", b" "]
streams = st.lists(st.sampled_from(_ALPHABET), max_size=60).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=400)
@given(
    stream=streams,
    cuts=st.lists(st.integers(0, 200), max_size=8),
    max_size=st.integers(0, 40),
    max_line=st.integers(0, 8),
)
def test_matches_reference_for_any_split(
    stream: bytes, cuts: list[int], max_size: int, max_line: int
) -> None:
    stream += END  # make sure it ends
    expected = reference_decode(stream, max_size, max_line)
    assert decode(_split(stream, cuts), max_size, max_line) == expected
    bytewise = [stream[i : i + 1] for i in range(len(stream))]
    assert decode(bytewise, max_size, max_line) == expected


@settings(max_examples=200)
@given(stream=streams, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_output_so_far_is_a_prefix_of_the_final_output(stream: bytes, cuts: list[int]) -> None:
    expected = reference_decode(stream + END)
    got = decode(_split(stream, cuts))
    if got.rest is None:
        assert expected.content.startswith(got.content)
    else:
        assert got == reference_decode(stream)


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_random_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    got = decode(_split(data + END, cuts), 50, 20)
    assert got == reference_decode(data + END, 50, 20)


@settings(max_examples=300)
@given(
    stream=streams,
    cuts=st.lists(st.integers(0, 200), max_size=8),
    max_size=st.sampled_from([0, 5, 40, 10_000]),
)
def test_newlines_counts_the_lfs_of_each_feed(
    stream: bytes, cuts: list[int], max_size: int
) -> None:
    """Stores take the LF count (for Maildir W= sizes) from the decoder: it is
    exact for every piece it returns, or -1 (only once output was cut short)."""
    decoder = DataDecoder(max_size, 998)
    for piece in _split(stream + END, cuts):
        content, _rest = decoder.feed(piece)
        if decoder.newlines >= 0:
            assert decoder.newlines == content.count(b"\n")
        else:
            assert decoder.oversize


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    limit=st.sampled_from([998, 2048, 2500, 65536]),
    cuts=st.lists(st.integers(0, 20000), max_size=6),
)
def test_long_lines_pass_whole_up_to_the_bound_for_any_split(
    lengths: list[int], limit: int, cuts: list[int]
) -> None:
    """The session's bound (``[limits] max_line_length``) is far above 998: lines
    up to it come out whole and unflagged whatever the chunking, one octet over
    it is flagged, and no line is ever held back whole (the decoder streams)."""
    lines = [bytes([0x61 + i % 26]) * n for i, n in enumerate(lengths)]
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\nQUIT\r\n"
    got = decode(_split(stream, cuts), max_line=limit)
    assert got.content == b"".join(line + b"\n" for line in lines)
    assert got.line_too_long is (max(lengths) > limit)
    assert got.rest == b"QUIT\r\n"
    decoder = DataDecoder(10**9, limit)
    for piece in _split(stream, cuts):
        decoder.feed(piece)
        assert len(decoder._tail) <= 4  # held back: at most a partial end of data


# --- BDAT content (RFC 3030): feed_octets -------------------------------------------


def octets(pieces: list[bytes], **limits: int) -> tuple[bytes, DataDecoder]:
    decoder = DataDecoder(
        limits.get("max_size", 10_000), limits.get("max_line", 998), dot_stuffed=False
    )
    out = b"".join(decoder.feed_octets(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    return out, decoder


def test_bdat_content_keeps_dots_and_joins_crlf_across_chunks() -> None:
    out, d = octets([b".a\r", b"\n..b\r\n.\r", b"\n", b""])
    assert out == b".a\n..b\n.\n"
    assert not (d.bare_cr or d.bare_lf) and d.size == len(out) and d.done


def test_bdat_content_flags_bare_cr_at_the_very_end_and_bare_lf() -> None:
    out, d = octets([b"a\r\n", b"b\r"])
    assert out == b"a\nb\r" and d.bare_cr
    out, d = octets([b"a\nb\r\n"])
    assert out == b"a\nb\n" and d.bare_lf and not d.bare_cr


def test_bdat_content_limits() -> None:
    out, d = octets([b"x" * 8, b"y" * 8 + b"\r\n"], max_size=10)
    assert out == b"x" * 8 + b"yy" and d.oversize and d.size == 17
    _, d = octets([b"z" * 5, b"z" * 5 + b"\r\n"], max_line=9)
    assert d.line_too_long


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_bdat_content_does_not_depend_on_where_chunks_split(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]
    whole, dw = octets([data])
    split, ds = octets(pieces)
    assert split == whole
    assert (ds.bare_cr, ds.bare_lf, ds.size) == (dw.bare_cr, dw.bare_lf, dw.size)
