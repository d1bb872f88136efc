"""8-bit to 7-bit conversion (delivery/downgrade.py, RFC 6152 §3): decoded, the
converted message says what the original said."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from postoffice.delivery.downgrade import DowngradeError, to_7bit

MULTIPART = (
    b"From: a@b.test\nSubject: x\nMIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary=XX\n\npre \xe9\n--XX\n"
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    b"Caf\xc3\xa9\n.dot\n" + b"\xc3\xa9" * 60 + b"\n--XX\n"
    b"Content-Type: application/octet-stream\n\n\x00\xff line\nnext\n--XX\n"
    b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n"
    b"Subject: inner\nContent-Type: text/plain\n\nin\xc3\xa9\n--XX\n"
    b"Content-Type: text/plain\n\nplain\n--XX--\nepilogue\n"
)


def leaves(message: bytes) -> list[object]:
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return [p.get_payload(decode=True) for p in parsed.walk() if not p.is_multipart()]


def test_every_part_is_7bit_and_decodes_to_the_original() -> None:
    out = to_7bit(MULTIPART)
    assert not re.search(rb"[\x80-\xff]", out)
    assert leaves(out)[0] == b"Caf\xc3\xa9\n.dot\n" + b"\xc3\xa9" * 60
    # Non-text: base64 of the CRLF wire form, which is what the 8bit part meant.
    assert leaves(out)[1] == b"\x00\xff line\r\nnext"
    assert b"in=C3=A9" in out  # inside the embedded message
    assert b"Content-Type: text/plain\n\nplain\n--XX--\nepilogue\n" in out  # untouched
    assert out.startswith(b"From: a@b.test\nSubject: x\nMIME-Version: 1.0\n")
    assert all(len(line) <= 76 for line in out.split(b"\n"))


def test_a_7bit_message_is_returned_as_it_is() -> None:
    message = b"Subject: s\n\nplain text\n"
    assert to_7bit(message) is message


def test_mime_version_is_added_when_missing_and_cte_replaced() -> None:
    out = to_7bit(b"Subject: s\nContent-Transfer-Encoding: 8bit\n\nGr\xc3\xbc\xc3\x9fe\n")
    assert out == (
        b"Subject: s\nContent-Transfer-Encoding: quoted-printable\nMIME-Version: 1.0\n"
        b"\nGr=C3=BC=C3=9Fe\n"
    )


@pytest.mark.parametrize(
    "message",
    [
        b"Subject: \xc3\xa9\n\nbody \xc3\xa9\n",  # header: SMTPUTF8's business
        b"Content-Transfer-Encoding: base64\n\n\xc3\xa9\n",  # claims base64 already
        b"Content-Type: multipart/mixed; boundary=B\n\n--B\n"
        b"Content-Disposition: attachment; filename=\xc3\xa9\n\nx\xc3\xa9\n--B--\n",
    ],
)
def test_what_cannot_be_converted_is_refused(message: bytes) -> None:
    with pytest.raises(DowngradeError):
        to_7bit(message)
