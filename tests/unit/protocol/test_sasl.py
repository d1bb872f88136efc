"""SASL helpers: PLAIN (RFC 4616), LOGIN, challenges (RFC 4954 §4)."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.protocol.sasl import (
    SaslError,
    decode_base64,
    decode_login_step,
    decode_plain,
    encode_challenge,
    is_cancel,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_plain_without_authzid() -> None:
    assert decode_plain(b64(b"\0alice@example.test\0s3cret")) == (
        "",
        "alice@example.test",
        "s3cret",
    )


def test_plain_with_authzid_and_utf8() -> None:
    token = b64("admin\0jörg\0pässwörd".encode())
    assert decode_plain(token) == ("admin", "jörg", "pässwörd")


def test_plain_keeps_spaces_in_password() -> None:
    assert decode_plain(b64(b"\0bob\0 pass word ")) == ("", "bob", " pass word ")


def test_plain_tolerates_surrounding_spaces() -> None:
    assert decode_plain("  " + b64(b"\0bob\0pw") + " ") == ("", "bob", "pw")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "=",
        "not base64!",
        "AGFsaWNl",  # "\0alice": no password
        b64(b"alice\0pw"),  # one NUL
        b64(b"\0\0pw"),  # empty authcid
        b64(b"\0alice\0"),  # empty password
        b64(b"a\0b\0c\0d"),  # three NULs
        b64(b"\0alice\0\xff\xfe"),  # not UTF-8
        b64(b"\0" + b"a" * 256 + b"\0pw"),  # RFC 4616: at most 255 octets
        b64(b"\0bob\0pw")[:-1],  # truncated
        b64(b"\0bob\0pw") + "\n",
        "AGJvYgBwdw==AGJvYgBwdw==",  # data after padding
        "é",
    ],
)
def test_plain_errors(token: str) -> None:
    with pytest.raises(SaslError):
        decode_plain(token)


def test_login_steps() -> None:
    assert decode_login_step(b64(b"alice@example.test")) == "alice@example.test"
    assert decode_login_step(b64("pässwörd".encode())) == "pässwörd"
    assert decode_login_step("=") == ""
    assert decode_login_step("") == ""


@pytest.mark.parametrize("token", ["***", b64(b"a\0b"), b64(b"\xff"), b64(b"x" * 256)])
def test_login_errors(token: str) -> None:
    with pytest.raises(SaslError):
        decode_login_step(token)


def test_challenges() -> None:
    assert encode_challenge("Username:") == "VXNlcm5hbWU6"
    assert encode_challenge("Password:") == "UGFzc3dvcmQ6"
    assert encode_challenge("") == ""


def test_cancel() -> None:
    assert is_cancel("*") and is_cancel(" * ")
    assert not is_cancel("Kg==")


def test_errors_are_value_errors() -> None:
    assert issubclass(SaslError, ValueError)


@given(st.text(max_size=80))
def test_challenge_round_trip(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be sent at all
    assert decode_base64(encode_challenge(text)) == text.encode("utf-8")


@given(st.text(max_size=200))
def test_any_text_decodes_or_raises_sasl_error(text: str) -> None:
    with contextlib.suppress(SaslError):
        decode_plain(text)
    with contextlib.suppress(SaslError):
        decode_login_step(text)
