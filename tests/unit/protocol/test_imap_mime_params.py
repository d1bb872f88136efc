"""Content-Type parameters for BODYSTRUCTURE (protocol/imap_mime.py)."""

from __future__ import annotations

from postoffice.protocol.imap_mime import parse_params


def test_rfc2231_continuations_are_joined_keeping_the_charset_encoding() -> None:
    # RFC 2231 §3 and §4.1; Dovecot answers the same (interop reference test).
    value = b"application/pdf; name*0*=UTF-8''r%C3%A9sum; name*1*=%C3%A9.pdf; x=1"
    assert parse_params(value) == (
        b"application/pdf",
        [(b"name*", b"UTF-8''r%C3%A9sum%C3%A9.pdf"), (b"x", b"1")],
    )


def test_plain_continuations_are_joined_in_section_order() -> None:
    value = b'text/plain; title*1="b c"; title*0="a "; charset=us-ascii'
    assert parse_params(value)[1] == [(b"title", b"a b c"), (b"charset", b"us-ascii")]


def test_single_extended_parameter_is_kept_as_written() -> None:
    value = b"text/plain; name*=UTF-8''caf%C3%A9"
    assert parse_params(value)[1] == [(b"name*", b"UTF-8''caf%C3%A9")]
