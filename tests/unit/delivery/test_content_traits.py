"""What the client learns from a message before MAIL FROM: SIZE, 8BITMIME, SMTPUTF8."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postoffice.delivery.content import MAX_HEADER_COPY, TraitScanner, header_section


def scan(*chunks: bytes):  # type: ignore[no-untyped-def]
    scanner = TraitScanner()
    for c in chunks:
        scanner.feed(c)
    return scanner.traits()


def test_ascii_message() -> None:
    t = scan(b"Subject: hi\n\nhello\n")
    assert (t.crlf_size, t.body_8bit, t.header_8bit) == (22, False, False)


def test_unterminated_last_line_counts_the_crlf_the_client_adds() -> None:
    assert scan(b"Subject: hi\n\nhello").crlf_size == scan(b"Subject: hi\n\nhello\n").crlf_size


def test_8bit_body_and_8bit_header_are_told_apart() -> None:
    body8 = scan("Subject: hi\n\nGr\u00fc\u00dfe\n".encode())
    assert body8.body_8bit and not body8.header_8bit
    head8 = scan("Subject: Gr\u00fc\u00dfe\n\nhello\n".encode())
    assert head8.header_8bit and not head8.body_8bit


def test_empty_line_split_across_chunks() -> None:
    t = scan(b"Subject: hi\n", b"\n\xc3\xa9\n")
    assert t.body_8bit and not t.header_8bit
    t = scan(b"Subject: hi\n", b"X-A: \xc3\xa9\n\nbody\n")
    assert t.header_8bit and not t.body_8bit


def test_message_without_header() -> None:
    t = scan(b"\n\xff body\n")
    assert t.body_8bit and not t.header_8bit


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_chunking_never_changes_the_traits(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert scan(*pieces) == scan(data)
    head, sep, body = data.partition(b"\n\n")
    if data.startswith(b"\n"):
        head, body = b"", data
    elif not sep:
        body = b""
    t = scan(data)
    assert t.header_8bit == any(b >= 0x80 for b in head)
    assert t.body_8bit == any(b >= 0x80 for b in body)


def test_header_section() -> None:
    assert header_section(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\nB: 2\n"
    assert header_section(b"\nbody\n") == b""
    assert header_section(b"A: 1") == b"A: 1\n"
    long = b"".join(b"X-%d: %s\n" % (i, b"y" * 60) for i in range(3000))
    head = header_section(long + b"\nbody")
    assert len(head) <= MAX_HEADER_COPY and head.endswith(b"\n") and long.startswith(head)


def test_tls_required_no_is_seen_in_the_header_only() -> None:
    """RFC 8689 §5: the header field, case-insensitive; not in the body."""
    for message, expected in [
        (b"From: a@b.test\ntls-required:  NO\n\nbody\n", True),
        (b"From: a@b.test\nTLS-Required: No\n\n", True),
        (b"From: a@b.test\nTLS-Required: Yes\n\n", False),
        (b"From: a@b.test\n\nTLS-Required: No\n", False),
        (b"From: a@b.test\nX-TLS-Required: No\n\n", False),
    ]:
        scanner = TraitScanner()
        for i in range(0, len(message), 7):  # across chunk boundaries
            scanner.feed(message[i : i + 7])
        assert scanner.traits().tls_optional is expected, message
