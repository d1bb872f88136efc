"""IMAP FETCH structure: ENVELOPE, BODY/BODYSTRUCTURE, sections, BINARY
(RFC 9051 §6.4.5, §7.5.2; RFC 3516), over stored (LF) messages."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol import imap_mime
from postoffice.protocol.imap_events import FetchItem, Section
from postoffice.protocol.imap_fetch import (
    FetchMessage,
    UnknownTransferEncoding,
    binary,
    bodystructure,
    envelope,
    partial,
    response_name,
    rfc822_size,
    section,
)
from postoffice.protocol.imap_response import Atom, untagged

# RFC 9051 §7.5.2's ENVELOPE example, as a header.
RFC_HEADER = b"""Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: Terry Gray <gray@cac.washington.edu>
Subject: IMAP4rev2 WG mtg summary and minutes
To: imap@cac.washington.edu
Cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>
Message-Id: <B27397-0100000@cac.washington.edu>

body
"""

MIXED = b"""From: a@example.com
To: b@example.com
Subject: mixed
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is a preamble.
--outer
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

caf=C3=A9 =
soft
--inner
Content-Type: text/html; charset=utf-8

<p>caf\xc3\xa9</p>
--inner--
--outer
Content-Type: application/pdf; name="a.pdf"
Content-Disposition: attachment; filename="a.pdf"
Content-Transfer-Encoding: base64
Content-Language: en, de
Content-Location: http://example.com/a.pdf
Content-ID: <pdf@example.com>
Content-Description: the file

aGVsbG8g
d29ybGQ=
--outer
Content-Type: message/rfc822

From: Inner <x@y.example>
Subject: inner
Content-Type: text/plain

line one
line two
--outer--
epilogue
"""


def test_rfc_envelope_example() -> None:
    assert envelope(RFC_HEADER) == (
        "Wed, 17 Jul 1996 02:23:25 -0700 (PDT)",
        "IMAP4rev2 WG mtg summary and minutes",
        (("Terry Gray", None, "gray", "cac.washington.edu"),),
        (("Terry Gray", None, "gray", "cac.washington.edu"),),
        (("Terry Gray", None, "gray", "cac.washington.edu"),),
        ((None, None, "imap", "cac.washington.edu"),),
        (
            (None, None, "minutes", "CNRI.Reston.VA.US"),
            ("John Klensin", None, "KLENSIN", "MIT.EDU"),
        ),
        None,
        None,
        "<B27397-0100000@cac.washington.edu>",
    )


def test_envelope_groups_routes_and_encoded_words_left_encoded() -> None:
    msg = (
        b"To: undisclosed-recipients:;\n"
        b'Cc: Team: a@b.example, "Q. Z\\"" <q@z.example> (c (nested));, '
        b"Mary <@r1,@r2:mary@x.example>, bare\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\n  folded\n"
        b"Sender:\n"
        b"Reply-To: =?utf-8?q?R=C3=A9?= <r@x.example>\n\n"
    )
    env = envelope(msg)
    assert env[0] is None and env[2] is None
    assert env[1] == "=?utf-8?q?caf=C3=A9?=  folded"
    assert env[3] is None  # Sender empty and From absent: NIL
    assert env[4] == (("=?utf-8?q?R=C3=A9?=", None, "r", "x.example"),)
    assert env[5] == ((None, None, "undisclosed-recipients", None), (None, None, None, None))
    assert env[6] == (
        (None, None, "Team", None),
        (None, None, "a", "b.example"),
        ('Q. Z"', None, "q", "z.example"),
        (None, None, None, None),
        ("Mary", "@r1,@r2", "mary", "x.example"),
        (None, None, "bare", "MISSING_DOMAIN"),
    )


def test_envelope_8bit_headers() -> None:
    env = envelope(b"Subject: caf\xc3\xa9\nFrom: J\xe9r\xf4me <j@x.example>\n\n")
    assert env[1] == "café"  # UTF-8 (RFC 6532): a string
    assert env[2] == ((b"J\xe9r\xf4me", None, "j", "x.example"),)  # not UTF-8: a literal


def test_bodystructure_of_a_real_world_message() -> None:
    # Dovecot 2.3 gives the same answer for this message, octet for octet.
    got = bodystructure(MIXED, True)
    alternative = (
        (
            "text",
            "plain",
            ("charset", "utf-8"),
            None,
            None,
            "quoted-printable",
            17,
            1,
            None,
            None,
            None,
            None,
        ),
        ("text", "html", ("charset", "utf-8"), None, None, "7bit", 12, 0, None, None, None, None),
        "alternative",
        ("boundary", "inner"),
        None,
        None,
        None,
    )
    pdf = (
        "application",
        "pdf",
        ("name", "a.pdf"),
        "<pdf@example.com>",
        "the file",
        "base64",
        18,
        None,
        ("attachment", ("filename", "a.pdf")),
        ("en", "de"),
        "http://example.com/a.pdf",
    )
    inner_env = (
        None,
        "inner",
        *[(("Inner", None, "x", "y.example"),)] * 3,
        None,
        None,
        None,
        None,
        None,
    )
    rfc822 = (
        "message",
        "rfc822",
        None,
        None,
        None,
        "7bit",
        89,
        inner_env,
        (
            "text",
            "plain",
            ("charset", "us-ascii"),
            None,
            None,
            "7bit",
            18,
            1,
            None,
            None,
            None,
            None,
        ),
        5,
        None,
        None,
        None,
        None,
    )
    assert got == (alternative, pdf, rfc822, "mixed", ("boundary", "outer"), None, None, None)
    body = bodystructure(MIXED, False)
    assert body[1] == pdf[:7]
    assert body[-1] == "mixed"
    # It goes through the response encoder unchanged.
    assert untagged(1, Atom("FETCH"), (Atom("BODYSTRUCTURE"), got)).startswith(
        b'* 1 FETCH (BODYSTRUCTURE ((("text"'
    )


def test_sections_of_a_real_world_message() -> None:
    m = FetchMessage(MIXED)
    wire = MIXED.replace(b"\n", b"\r\n")
    assert m.section(Section()) == wire and m.size == len(wire) == rfc822_size(MIXED)
    header = m.section(Section(text="HEADER"))
    assert header + m.section(Section(text="TEXT")) == wire
    assert header.endswith(b'boundary="outer"\r\n\r\n')
    assert m.section(Section((1, 1))) == b"caf=C3=A9 =\r\nsoft"
    assert m.section(Section((1, 2), "MIME")) == b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    assert (
        m.section(Section((3,), "HEADER"))
        == b"From: Inner <x@y.example>\r\nSubject: inner\r\nContent-Type: text/plain\r\n\r\n"
    )
    assert m.section(Section((3,), "TEXT")) == b"line one\r\nline two"
    assert m.section(Section((3, 1))) == b"line one\r\nline two"
    assert m.section(Section((3,))).startswith(b"From: Inner")
    assert (
        m.section(Section((), "HEADER.FIELDS", ("SUBJECT", "TO")))
        == b"To: b@example.com\r\nSubject: mixed\r\n\r\n"
    )
    not_fields = m.section(
        Section((), "HEADER.FIELDS.NOT", ("FROM", "TO", "SUBJECT", "MIME-VERSION"))
    )
    assert not_fields == b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
    assert (
        m.section(Section((9,)))
        == m.section(Section((2, 1)))
        == m.section(Section((1, 1, 1)))
        == b""
    )
    assert m.binary((2,)) == b"hello world"
    assert m.binary((1, 1)) == "café soft".encode()
    assert m.binary((3,)) == m.section(Section((3,)))
    assert m.binary(()) == wire


def test_single_part_message_part_one_is_its_body() -> None:
    msg = b"Subject: x\n\nhello\n"
    assert section(msg, Section((1,))) == b"hello\r\n"
    assert section(msg, Section((1,), "MIME")) == b"Subject: x\r\n\r\n"
    assert section(msg, Section((2,))) == b""
    assert bodystructure(msg, False) == (
        "text",
        "plain",
        ("charset", "us-ascii"),
        None,
        None,
        "7bit",
        7,
        1,
    )


def test_no_content_type_no_blank_line_no_final_newline() -> None:
    assert bodystructure(b"Subject: only a header", False)[6:] == (0, 0)
    assert bodystructure(b"Subject: x\n\nno newline", False)[6:] == (10, 0)
    assert rfc822_size(b"a\nb") == 4 and rfc822_size(b"a\r\nb\rc\n") == 8


def test_bad_boundaries() -> None:
    # The boundary never appears: no parts (one empty text part is shown).
    msg = b"Content-Type: multipart/mixed; boundary=zz\n\nno parts here\n"
    assert bodystructure(msg, False) == (
        ("text", "plain", ("charset", "us-ascii"), None, None, "7bit", 0, 0),
        "mixed",
    )
    # No boundary parameter at all.
    assert bodystructure(b"Content-Type: multipart/mixed\n\n--x\n\nhi\n", False)[-1] == "mixed"
    # Missing close delimiter: the last part runs to the end.
    msg = b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n--b\n\ntwo\n"
    assert section(msg, Section((2,))) == b"two\r\n"
    # "--bX" is another boundary, not ours.
    msg = b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n--bX\n--b  \n\ntwo\n--b--\n"
    assert section(msg, Section((1,))) == b"one\r\n--bX"
    assert section(msg, Section((2,))) == b"two"


def test_digest_default_is_message_rfc822() -> None:
    msg = b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\nbody\n--d--\n"
    got = bodystructure(msg, False)
    assert got[0][:2] == ("message", "rfc822")
    assert section(msg, Section((1,), "HEADER")) == b"Subject: one\r\n\r\n"


def test_base64_message_rfc822_is_opaque() -> None:
    msg = b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogeA==\n"
    assert bodystructure(msg, False)[:2] == ("application", "octet-stream")


def test_binary_decoding_and_unknown_encoding() -> None:
    data = bytes(range(256))
    msg = b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(data)
    assert binary(msg, (1,)) == data
    assert binary(b"Content-Transfer-Encoding: base64\n\n!!aGk*\n", (1,)) == b"hi"
    assert binary(b"Content-Transfer-Encoding: base64\n\naGk=junk\n", (1,)) == b"hi"
    assert binary(b"Content-Transfer-Encoding: base64\n\naGkx2\n", (1,)) == b"hi1"
    with pytest.raises(UnknownTransferEncoding):
        binary(b"Content-Transfer-Encoding: x-uuencode\n\nbegin\n", (1,))


def test_partial_and_response_name() -> None:
    assert partial(b"0123456789", (2, 3)) == b"234"
    assert partial(b"0123456789", (20, 3)) == b""
    assert partial(b"abc", None) == b"abc"
    item = FetchItem("BODY", Section((1,), "HEADER.FIELDS", ("FROM",)), (0, 10), peek=True)
    assert response_name(item).text == "BODY[1.HEADER.FIELDS (FROM)]<0>"
    assert response_name(FetchItem("ENVELOPE")).text == "ENVELOPE"


def test_nesting_and_part_count_are_bounded() -> None:
    deep = b""
    for i in range(300):
        deep += b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i)
    deep += b"\nleaf\n"
    got = bodystructure(deep, True)  # no RecursionError
    depth = 0
    node: object = got
    while isinstance(node, tuple) and isinstance(node[0], tuple):
        node, depth = node[0], depth + 1
    assert depth < imap_mime.MAX_DEPTH
    many = b"Content-Type: multipart/mixed; boundary=b\n\n" + b"--b\n\nx\n" * (
        imap_mime.MAX_PARTS + 50
    )
    assert len(bodystructure(many, False)) - 1 < imap_mime.MAX_PARTS
    nested_msgs = b"Content-Type: message/rfc822\n\n" * 500 + b"\nend\n"
    bodystructure(nested_msgs, True)


# --- properties -----------------------------------------------------------------

_lines = st.sampled_from(
    [
        b"",
        b"Content-Type: multipart/mixed; boundary=a",
        b"Content-Type: multipart/alternative; boundary=b",
        b"Content-Type: message/rfc822",
        b'Content-Type: text/plain; charset="utf-8"',
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"Content-Disposition: attachment; filename=x",
        b"From: A <a@b>, g: c@d;",
        b'To: "x" <',
        b"--a",
        b"--b",
        b"--a--",
        b"--b--",
        b"aGVsbG8=",
        b"caf=C3=A9=",
        b"\xff\xfe",
        b"Subject: (",
        b" folded",
        b"\r",
    ]
)
messages = st.lists(_lines, max_size=40).map(lambda lines: b"\n".join(lines)) | st.binary(
    max_size=300
)


def _leaves(structure: tuple[object, ...]) -> int:
    return (
        sum(_leaves(c) for c in structure if isinstance(c, tuple) and c and isinstance(c[0], tuple))
        or 1
    )


@settings(max_examples=200, deadline=None)
@given(messages)
def test_never_raises_and_sizes_agree(msg: bytes) -> None:
    m = FetchMessage(msg)
    assert m.size == len(m.section(Section())) == rfc822_size(msg)
    untagged(
        1,
        Atom("FETCH"),
        (Atom("ENVELOPE"), m.envelope(), Atom("BODYSTRUCTURE"), m.bodystructure(True)),
    )
    untagged(1, Atom("FETCH"), (Atom("BODY"), m.bodystructure(False)))
    assert m.section(Section(text="HEADER")) + m.section(Section(text="TEXT")) == m.wire
    for numbers in [(1,), (1, 1), (2,), (1, 2, 1), (3, 1)]:
        body = m.section(Section(numbers))
        mime = m.section(Section(numbers, "MIME"))
        if body or mime:
            assert (mime + body) in m.wire  # a part is its MIME header then its body
        try:
            decoded = m.binary(numbers)
        except UnknownTransferEncoding:  # e.g. "base64 folded": NO [UNKNOWN-CTE]
            continue
        assert isinstance(decoded, bytes)
        m.section(Section(numbers, "HEADER.FIELDS", ("FROM",)))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.binary(max_size=40).filter(lambda b: b"--" not in b and b"\r" not in b),
        min_size=1,
        max_size=6,
    )
)
def test_parts_concatenate_to_the_body(parts: list[bytes]) -> None:
    body = b"".join(b"--sep\n\n" + p + b"\n" for p in parts) + b"--sep--\n"
    msg = b"Content-Type: multipart/mixed; boundary=sep\n\n" + body
    m = FetchMessage(msg)
    got = [m.section(Section((i + 1,))) for i in range(len(parts))]
    assert got == [p.replace(b"\n", b"\r\n") for p in parts]
    structure = m.bodystructure(False)
    assert len(structure) == len(parts) + 1
    assert [s[6] for s in structure[:-1] if isinstance(s, tuple)] == [len(g) for g in got]
