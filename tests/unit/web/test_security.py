"""web/security.py: sessions, tokens, cookies and forms, with a fake clock."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.mail.address import Address
from postoffice.web.security import (
    MAX_COOKIE_PAIRS,
    MAX_FORM_FIELDS,
    FormError,
    LoginTokens,
    SessionTable,
    parse_cookies,
    parse_form,
    set_cookie,
    tokens_match,
)

ALICE = Address("alice", "example.test")
BOB = Address("bob", "example.test")
FORM = b"application/x-www-form-urlencoded"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_found_by_its_id_only() -> None:
    table = SessionTable(Clock())
    session_id, session = table.create(ALICE)
    assert table.get(session_id) is session
    assert table.get(session_id + "x") is None
    assert table.get("") is None and table.get(None) is None
    assert table.get("a" * 1000) is None
    other_id, _other = table.create(ALICE)
    assert other_id != session_id and len(session_id) >= 40
    assert _other.csrf != session.csrf


def test_sessions_end_when_idle_and_when_old() -> None:
    clock = Clock()
    table = SessionTable(clock, idle=60, max_age=300)
    session_id, _s = table.create(ALICE)
    for _ in range(4):
        clock.now += 59
        assert table.get(session_id) is not None  # each request keeps it alive
    clock.now += 61
    assert table.get(session_id) is None  # past max_age (and gone for good)
    clock.now -= 61
    assert table.get(session_id) is None
    idle_id, _s = table.create(ALICE)
    clock.now += 61
    assert table.get(idle_id) is None


def test_the_table_is_bounded_least_recently_used_first() -> None:
    table = SessionTable(Clock(), max_sessions=3)
    ids = [table.create(ALICE)[0] for _ in range(3)]
    assert table.get(ids[0]) is not None  # used: now the most recent
    fourth, _s = table.create(BOB)
    assert len(table) == 3
    assert table.get(ids[1]) is None
    assert all(table.get(i) is not None for i in (ids[0], ids[2], fourth))


def test_drop_and_drop_account() -> None:
    table = SessionTable(Clock())
    a1, _ = table.create(ALICE)
    a2, _ = table.create(ALICE)
    b1, _ = table.create(BOB)
    table.drop(a1)
    assert table.get(a1) is None and table.get(a2) is not None
    table.drop_account(ALICE)
    assert table.get(a2) is None and table.get(b1) is not None


def test_login_tokens_are_bound_to_their_cookie_and_process() -> None:
    tokens = LoginTokens()
    cookie = tokens.new_cookie()
    token = tokens.token(cookie)
    assert tokens.check(cookie, token)
    assert not tokens.check(tokens.new_cookie(), token)
    assert not tokens.check(cookie, token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert not tokens.check(None, token) and not tokens.check(cookie, None)
    assert not LoginTokens().check(cookie, token)  # another process's key


def test_tokens_match() -> None:
    assert tokens_match("abc", "abc")
    assert not tokens_match("abc", None) and not tokens_match("abc", "abd")
    assert not tokens_match("abc", "é")  # no exception on non-ASCII


def test_set_cookie_has_every_flag() -> None:
    name, value = set_cookie("__Host-x", "v")
    assert name == "Set-Cookie"
    assert value == "__Host-x=v; Path=/; Secure; HttpOnly; SameSite=Strict"


def test_cookies_are_parsed_first_value_wins_bounded() -> None:
    headers = ((b"cookie", b"a=1; b=2; a=3"), (b"host", b"x"), (b"cookie", b"c = 4 ;junk"))
    assert parse_cookies(headers) == {"a": "1", "b": "2", "c": "4"}
    many = "; ".join(f"k{i}=v" for i in range(MAX_COOKIE_PAIRS + 10)).encode()
    assert len(parse_cookies(((b"cookie", many),))) == MAX_COOKIE_PAIRS


@given(st.binary(max_size=300))
def test_any_cookie_header_parses_without_raising(raw: bytes) -> None:
    parse_cookies(((b"cookie", raw),))


def test_forms() -> None:
    assert parse_form(FORM, b"a=1&b=%3Cx%3E&a=2&c=") == {"a": "1", "b": "<x>", "c": ""}
    assert parse_form(FORM + b"; charset=UTF-8", b"n=%C3%A9") == {"n": "é"}
    for kind in (None, b"application/json", b"multipart/form-data; boundary=x"):
        with pytest.raises(FormError):
            parse_form(kind, b"a=1")
    with pytest.raises(FormError):
        parse_form(FORM, b"n=%FF")  # not UTF-8
    with pytest.raises(FormError):
        parse_form(FORM, "n=é".encode())  # a raw octet over 127
    with pytest.raises(FormError):
        parse_form(FORM, "&".join(f"f{i}=1" for i in range(MAX_FORM_FIELDS + 1)).encode())


@given(st.binary(max_size=300))
def test_any_form_body_parses_or_is_refused(raw: bytes) -> None:
    with contextlib.suppress(FormError):
        parse_form(FORM, raw)
