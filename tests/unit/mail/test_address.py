"""Address parsing (RFC 5321 §4.1.2 paths) and the account-safe local part."""

from __future__ import annotations

import os.path
from pathlib import PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from postoffice.mail.address import (
    Address,
    AddressError,
    mailbox_local_part,
    normalise_domain,
    parse_address,
    parse_mailbox,
    parse_path,
    split_plus,
)

# --- parse_path ----------------------------------------------------------------------


def test_null_path_is_none() -> None:
    assert parse_path("<>") is None


def test_plain_path() -> None:
    assert parse_path("<Alice@Example.TEST>") == Address("Alice", "example.test")


def test_local_part_case_is_kept_domain_is_lowered() -> None:
    addr = parse_path("<John.Smith@MAIL.Example.Test>")
    assert addr == Address("John.Smith", "mail.example.test")
    assert str(addr) == "John.Smith@mail.example.test"


@pytest.mark.parametrize(
    "text",
    ["<@relay.test:bob@example.test>", "<@a.test,@b.test:bob@example.test>"],
)
def test_source_routes_are_ignored(text: str) -> None:
    # RFC 5321 §4.1.1.3 / Appendix C: accept, then ignore the route.
    assert parse_path(text) == Address("bob", "example.test")


@pytest.mark.parametrize(
    "text", ["<@relay.test bob@example.test>", "<@relay.test,x.test:bob@example.test>"]
)
def test_malformed_source_routes(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


@pytest.mark.parametrize(
    "local",
    ['"john doe"', '"john@home"', '"a\\"b"', '""', '"\\\\"'],
)
def test_quoted_local_parts(local: str) -> None:
    addr = parse_path(f"<{local}@example.test>")
    assert addr == Address(local, "example.test")


@pytest.mark.parametrize("local", ["user%remote.test", "remote.test!user", "a+b", "o'neil", "{x}"])
def test_legacy_routing_characters_are_accepted_syntactically(local: str) -> None:
    assert parse_path(f"<{local}@example.test>") == Address(local, "example.test")


@pytest.mark.parametrize(
    "text",
    [
        "alice@example.test",  # no brackets
        "<alice@example.test",
        "<alice>",
        "<@example.test>",
        "<alice@>",
        "<alice example@example.test>",
        "<.alice@example.test>",
        "<alice.@example.test>",
        "<a..b@example.test>",
        '<"unterminated@example.test>',
        '<"bad\x01char"@example.test>',
        "<alice@exa mple.test>",
        "<alice@-example.test>",
        "<alice@example.test.>",
        "<alice@[300.1.1.1]>",
        "<alice@[127.0.0.1>",
    ],
)
def test_bad_paths(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_address_literals() -> None:
    assert parse_path("<a@[127.0.0.1]>") == Address("a", "[127.0.0.1]")
    v6 = parse_path("<a@[IPv6:0:0:0:0:0:0:0:1]>")
    assert v6 == Address("a", "[IPv6:::1]")
    assert v6 is not None and v6.is_literal


def test_length_limits() -> None:
    # On the wire a local part may pass the 64 octets of RFC 5321 §4.5.3.1.1
    # (SRS and VERP return paths do; §4.5.3.1 asks for no limits where
    # possible): only the path limit holds.  Account names keep 64.
    assert parse_path(f"<{'a' * 65}@example.test>") is not None
    assert parse_path(f"<{'a' * 200}@example.test>") is not None
    with pytest.raises(AddressError, match="too long"):
        parse_path(f"<{'a' * 250}@example.test>")
    with pytest.raises(AddressError, match="local part too long"):
        parse_address(f"{'a' * 253}@example.test")
    with pytest.raises(AddressError, match="at most 64"):
        mailbox_local_part("a" * 65)
    # §4.5.3.1.3: the whole path at most 256 octets, brackets included.
    domain = ".".join(["d" * 60] * 3) + ".test"  # 188 octets
    ok = f"<{'a' * 64}@{domain}>"
    assert len(ok) == 254
    assert parse_path(ok) is not None
    with pytest.raises(AddressError, match="path too long"):
        parse_path(f"<@{'r' * 60}.test:{'a' * 64}@{domain}>")


def test_utf8_only_with_smtputf8() -> None:
    # RFC 6531 §3.3: non-ASCII local parts and domains only under SMTPUTF8.
    for text in ("<jörg@example.test>", "<jorg@bücher.example>", '<"jörg"@example.test>'):
        with pytest.raises(AddressError):
            parse_path(text)
    assert parse_path("<jörg@example.test>", utf8=True) == Address("jörg", "example.test")
    assert parse_path("<jorg@bücher.example>", utf8=True) == Address(
        "jorg", "xn--bcher-kva.example"
    )
    assert parse_path('<"jö rg"@example.test>', utf8=True) == Address('"jö rg"', "example.test")


@pytest.mark.parametrize(
    "text",
    [
        "<a\udcffb@example.test>",  # an undecodable byte, as surrogateescape gives it
        '<"a\udcff"@example.test>',
        "<\ud800@example.test>",
        "<a@b\udcff.test>",
        "<@r\ud800.test:a@example.test>",
        "<a\x7fb@example.test>",  # DEL is not atext in either mode
    ],
)
@pytest.mark.parametrize("utf8", [False, True])
def test_invalid_utf8_and_controls_are_refused_not_crashes(text: str, utf8: bool) -> None:
    with pytest.raises(AddressError):
        parse_path(text, utf8=utf8)


def test_hyphen_is_atext_in_both_modes() -> None:
    for utf8 in (False, True):
        assert parse_path("<a-b@example.test>", utf8=utf8) == Address("a-b", "example.test")


def test_utf8_local_part_length_counts_octets() -> None:
    assert parse_path(f"<{'ö' * 120}@example.test>", utf8=True) is not None  # 240 octets
    with pytest.raises(AddressError, match="local part too long"):
        parse_address(f"{'ö' * 127}@example.test", utf8=True)  # 254 octets, 127 characters


def test_parse_address_without_brackets() -> None:
    assert parse_address("a@b.test") == Address("a", "b.test")
    assert parse_address('"x@y"@b.test') == Address('"x@y"', "b.test")
    for bad in ("", "@b.test", "a@", "ab.test"):
        with pytest.raises(AddressError):
            parse_address(bad)


# --- normalise_domain -----------------------------------------------------------------


def test_idna_domains() -> None:
    assert normalise_domain("bücher.example") == "xn--bcher-kva.example"
    assert normalise_domain("BÜCHER.Example") == "xn--bcher-kva.example"
    assert normalise_domain("Example.TEST") == "example.test"
    assert normalise_domain("xn--bcher-kva.example") == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    "text, expected",
    [
        # IDNA 2003 (Python's "idna" codec) maps ß to "ss" and final sigma to sigma: another
        # domain, with another owner.  IDNA 2008 keeps them (RFC 5892 PVALID).
        ("faß.de", "xn--fa-hia.de"),
        ("FASS.de", "fass.de"),
        ("βόλος.gr", "xn--nxasmm1c.gr"),
        # UTS #46 mapping: case, full-width letters, the ideographic full stop.
        ("ＢÜＣＨＥＲ。example", "xn--bcher-kva.example"),
        # ASCII labels beside U-labels are judged as in an all-ASCII domain.
        ("ab--cd.bücher.example", "ab--cd.xn--bcher-kva.example"),
        ("xn--fa-hia.bücher.example", "xn--fa-hia.xn--bcher-kva.example"),
    ],
)
def test_idna_2008_with_uts46_mapping(text: str, expected: str) -> None:
    assert normalise_domain(text) == expected
    assert normalise_domain(expected) == expected
    assert parse_path(f"<user@{text}>", utf8=True) == Address("user", expected)


@pytest.mark.parametrize(
    "text",
    [
        "☃.example",  # a symbol: allowed by IDNA 2003, DISALLOWED in IDNA 2008
        "i♥ny.example",
        "a\u200db.example",  # ZERO WIDTH JOINER outside its context (RFC 5892 A.2)
        "\u0663\u0661a.example",  # Arabic-Indic digits then Latin: the bidi rule (RFC 5893)
        "a\udcff.example",  # invalid UTF-8 on the wire (surrogateescape)
        "\u0301a.example",  # a label starting with a combining mark (RFC 5891 §4.2.3.2)
        "bü\u00a0cher.example",  # NO-BREAK SPACE maps to a space: not a label character
    ],
)
def test_invalid_idna_2008_labels_are_refused(text: str) -> None:
    with pytest.raises(AddressError, match=r"IDNA 2008|invalid domain label"):
        normalise_domain(text)
    with pytest.raises(AddressError):
        parse_path(f"<user@{text}>", utf8=True)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.test.",
        "a..b",
        ".a",
        "-a.test",
        "a-.test",
        "a_b.test",
        f"{'a' * 64}.test",
        ".".join(["a" * 63] * 4) + ".test",
        "exa mple.test",
        "a\x00.test",
    ],
)
def test_bad_domains(text: str) -> None:
    with pytest.raises(AddressError):
        normalise_domain(text)


def test_longest_label() -> None:
    assert normalise_domain(f"{'a' * 63}.test") == f"{'a' * 63}.test"


# --- mailbox_local_part / parse_mailbox -------------------------------------------------


@pytest.mark.parametrize(
    ("local", "name"),
    [("alice", "alice"), ("Alice.Smith", "alice.smith"), ("a_b-c.9", "a_b-c.9"), ("0", "0")],
)
def test_account_names(local: str, name: str) -> None:
    assert mailbox_local_part(local) == name


@pytest.mark.parametrize(
    "local",
    [
        "../x",
        "..",
        ".",
        "a/b",
        "a\\b",
        "a\x00b",
        ".a",
        "a..b",
        "a.",
        "a" * 65,
        "jörg",
        "",
        "a+b",
        "a%b",
        "a!b",
        '"alice"',
        "-a",
        "_a",
        "a b",
        "a\nb",
    ],
)
def test_unsafe_account_names_are_refused(local: str) -> None:
    with pytest.raises(AddressError):
        mailbox_local_part(local)


def test_longest_account_name() -> None:
    assert mailbox_local_part("a" * 64) == "a" * 64


def test_parse_mailbox() -> None:
    assert parse_mailbox("  Alice@Bücher.Example ") == Address("alice", "xn--bcher-kva.example")
    for bad in ("alice@[127.0.0.1]", '"alice"@example.test', "a/b@example.test", "alice"):
        with pytest.raises(AddressError):
            parse_mailbox(bad)


@pytest.mark.parametrize(
    ("local", "base"),
    [("alice+tag", "alice"), ("alice+a+b", "alice"), ("alice", "alice"), ("+tag", "+tag")],
)
def test_split_plus(local: str, base: str) -> None:
    assert split_plus(local) == base


def test_split_plus_other_separator() -> None:
    assert split_plus("alice-tag", "-") == "alice"


# --- properties ------------------------------------------------------------------------

_NASTY = st.sampled_from(["/", "\\", ".", "..", "\x00", "\n", "%", "!", "+", "@", "ö", "\u202e"])
_LOCALS = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=80),
    st.lists(st.one_of(_NASTY, st.from_regex(r"[A-Za-z0-9._-]{0,8}", fullmatch=True))).map("".join),
)


@given(_LOCALS)
@example("../etc")
@example("a/../../b")
@example("." * 3)
def test_mailbox_local_part_is_always_one_safe_path_component(local: str) -> None:
    try:
        name = mailbox_local_part(local)
    except AddressError:
        return
    assert name and name.isascii() and name.isprintable()
    assert len(name) <= 64
    assert name == name.lower()
    assert name not in (".", "..") and not name.startswith(".") and ".." not in name
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert PurePosixPath(name).name == name
    assert os.path.normpath(os.path.join("/mail/example.test", name)) == (
        f"/mail/example.test/{name}"
    )
    # Idempotent: an account name is its own account form.
    assert mailbox_local_part(name) == name


# Every code point, surrogates included: the SMTP core may decode with surrogateescape.
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=300)


@given(_ANY_TEXT, st.booleans())
def test_parse_path_only_ever_raises_address_error(text: str, utf8: bool) -> None:
    try:
        addr = parse_path(text, utf8=utf8)
    except AddressError:
        return
    if addr is not None:
        assert "@" not in addr.domain
        # What came out parses again to itself: normalisation is stable.
        assert parse_path(f"<{addr}>", utf8=True) == addr


@given(st.from_regex(r"<[a-z0-9.%!+]{1,20}@[a-z0-9.-]{1,30}>", fullmatch=True))
def test_parse_path_on_plausible_paths(text: str) -> None:
    try:
        addr = parse_path(text)
    except AddressError:
        return
    assert addr is not None
    assert f"<{addr}>" == text.lower() or f"<{addr.local}@" in text
