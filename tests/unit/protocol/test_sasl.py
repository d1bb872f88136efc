"""The SASL exchange (RFC 4422): PLAIN (RFC 4616), LOGIN, cancel and initial
responses (RFC 4954 §4, RFC 5034 §4), the authzid rule."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.protocol.sasl import (
    MAX_FIELD,
    MECHANISMS,
    Challenge,
    Done,
    Fail,
    FailKind,
    Outcome,
    SaslError,
    SaslExchange,
    authzid_permitted,
)

ALICE = "alice@example.test"
CANCELLED = Fail(FailKind.CANCELLED, "Authentication cancelled")
NOT_PERMITTED = Fail(FailKind.NOT_PERMITTED, "Acting as another user is not permitted")
NOT_BASE64 = Fail(FailKind.MALFORMED, "response is not base64")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def exchange(mechanism: str) -> SaslExchange:
    started = SaslExchange.start(mechanism)
    assert started is not None
    return started


def plain(token: str | None) -> Outcome:
    """PLAIN with ``token`` as the initial response (None: without one)."""
    return exchange("PLAIN").initial(token)


def plain_answered(line: str) -> Outcome:
    """PLAIN without an initial response, ``line`` answering the empty challenge."""
    sasl = exchange("PLAIN")
    assert sasl.initial(None) == Challenge(b"")
    return sasl.respond(line)


# --- mechanisms offered ------------------------------------------------------------


def test_mechanisms_in_the_order_offered() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")


@pytest.mark.parametrize("name", ["PLAIN", "plain", "Login", "LOGIN"])
def test_start_takes_any_case(name: str) -> None:
    assert SaslExchange.start(name) is not None


@pytest.mark.parametrize("name", ["CRAM-MD5", "SCRAM-SHA-256", "", "PLAIN ", "XOAUTH2"])
def test_start_refuses_what_is_not_offered(name: str) -> None:
    assert SaslExchange.start(name) is None


# --- PLAIN (RFC 4616) --------------------------------------------------------------


def test_plain_with_an_initial_response() -> None:
    assert plain(b64(b"\0alice@example.test\0s3cret")) == Done(ALICE, "s3cret")


def test_plain_without_an_initial_response_asks_with_an_empty_challenge() -> None:
    sasl = exchange("PLAIN")
    challenge = sasl.initial(None)
    assert challenge == Challenge(b"")
    assert isinstance(challenge, Challenge) and challenge.base64 == ""  # "334 ", "+ "
    assert sasl.respond(b64(b"\0alice@example.test\0s3cret")) == Done(ALICE, "s3cret")


def test_plain_utf8_and_spaces_in_the_password() -> None:
    assert plain(b64("jörg\0jörg\0 pä ss ".encode())) == Done("jörg", " pä ss ", "jörg")


def test_plain_tolerates_white_space_around_the_line() -> None:
    assert plain("  " + b64(b"\0bob\0pw") + " ") == Done("bob", "pw")
    assert plain_answered("\t" + b64(b"\0bob\0pw") + " \r") == Done("bob", "pw")


def test_plain_fields_of_255_octets_pass_and_of_256_do_not() -> None:
    name = "a" * (MAX_FIELD - len("@example.test")) + "@example.test"
    password = "p" * MAX_FIELD
    assert plain(b64(f"{name}\0{name}\0{password}".encode())) == Done(name, password, name)
    too_long = Fail(FailKind.MALFORMED, "PLAIN response field too long")
    assert plain(b64(b"\0" + b"a" * 256 + b"\0pw")) == too_long
    assert plain(b64(b"\0bob\0" + b"p" * 256)) == too_long
    assert plain(b64(b"b" * 256 + b"\0bob\0pw")) == too_long


SHAPE = "PLAIN response must be authzid NUL authcid NUL password"
NAME_AND_PASSWORD = "PLAIN response needs a user name and a password"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", SHAPE),  # empty
        ("=", SHAPE),  # RFC 4954 §4: "=" is an empty response
        ("not base64!", "response is not base64"),
        ("AGFsaWNl", SHAPE),  # "\0alice": no password
        (b64(b"alice\0pw"), SHAPE),  # one NUL
        (b64(b"\0\0pw"), NAME_AND_PASSWORD),  # empty authcid
        (b64(b"\0alice\0"), NAME_AND_PASSWORD),  # empty password
        (b64(b"a\0b\0c\0d"), SHAPE),  # three NULs
        (b64(b"\xff\0alice\0pw"), "authzid is not UTF-8"),
        (b64(b"\0al\xffice\0pw"), "user name is not UTF-8"),
        (b64(b"\0alice\0\xff\xfe"), "password is not UTF-8"),
        (b64(b"\0bob\0pw")[:-1], "response is not base64"),  # truncated
        (b64(b"\0bob\0pw")[:-2] + "=", "response is not base64"),  # bad padding
        ("AGJvYgBwdw==AGJvYgBwdw==", "response is not base64"),  # data after padding
        ("AGJv YgBwdw==", "response is not base64"),  # a space inside
        ("é", "response is not base64"),
        ("*", "response is not base64"),  # no cancel before a challenge (RFC 4954 §4)
    ],
)
def test_plain_errors(token: str, reason: str) -> None:
    assert plain(token) == Fail(FailKind.MALFORMED, reason)
    if token != "*":  # in answer to the challenge, "*" cancels
        assert plain_answered(token) == Fail(FailKind.MALFORMED, reason)


# --- the authzid rule (RFC 4616 §2) -----------------------------------------------


@pytest.mark.parametrize(
    ("authzid", "authcid"),
    [
        ("", ALICE),  # none: act as the user who logs in
        (ALICE, ALICE),
        ("Alice@Example.TEST", ALICE),  # the account store lower-cases both parts
        (ALICE, "ALICE@EXAMPLE.TEST"),
        (" alice@example.test", ALICE),  # parse_mailbox strips, as a login does
        ("alice@bücher.example", "alice@xn--bcher-kva.example"),  # U- and A-labels
        ("Jörg", "Jörg"),  # no mailbox, but the very name (its login fails on its own)
    ],
)
def test_authzid_of_the_same_account_is_permitted(authzid: str, authcid: str) -> None:
    assert authzid_permitted(authzid, authcid)
    token = b64(f"{authzid}\0{authcid}\0pw".encode())
    assert plain(token) == Done(authcid, "pw", authzid)


@pytest.mark.parametrize(
    ("authzid", "authcid"),
    [
        ("bob@example.test", ALICE),
        ("alice@example.org", ALICE),  # same name, other domain
        ("alice", ALICE),  # no domain
        ("alice@example.test.", ALICE),  # not a mailbox (trailing dot)
        ('"alice"@example.test', ALICE),  # quoted: no account is named so
        ("admin", "jörg"),
        ("alice", "ALICE"),  # neither is a mailbox: only the very name passes
        ("alice@[192.0.2.1]", "alice@[192.0.2.2]"),  # address literals name no account
    ],
)
def test_authzid_of_another_is_refused(authzid: str, authcid: str) -> None:
    assert not authzid_permitted(authzid, authcid)
    token = b64(f"{authzid}\0{authcid}\0pw".encode())
    assert plain(token) == NOT_PERMITTED
    assert plain_answered(token) == NOT_PERMITTED


# --- LOGIN (draft-murchison-sasl-login) ---------------------------------------------


def test_login_asks_for_the_name_then_the_password() -> None:
    sasl = exchange("LOGIN")
    username = sasl.initial(None)
    assert username == Challenge(b"Username:")
    assert isinstance(username, Challenge) and username.base64 == "VXNlcm5hbWU6"
    password = sasl.respond(b64(ALICE.encode()))
    assert password == Challenge(b"Password:")
    assert isinstance(password, Challenge) and password.base64 == "UGFzc3dvcmQ6"
    assert sasl.respond(b64("pässwörd".encode())) == Done(ALICE, "pässwörd")


def test_login_with_the_name_as_initial_response() -> None:
    sasl = exchange("LOGIN")
    assert sasl.initial(b64(ALICE.encode())) == Challenge(b"Password:")
    assert sasl.respond(b64(b"pw")) == Done(ALICE, "pw")


def test_login_empty_name_and_password() -> None:
    sasl = exchange("LOGIN")
    assert sasl.initial("=") == Challenge(b"Password:")  # RFC 4954 §4: "=" is empty
    assert sasl.respond("") == Done("", "")


def test_login_fields_of_255_octets_pass() -> None:
    sasl = exchange("LOGIN")
    assert sasl.initial(b64(b"n" * MAX_FIELD)) == Challenge(b"Password:")
    assert sasl.respond(b64(b"p" * MAX_FIELD)) == Done("n" * MAX_FIELD, "p" * MAX_FIELD)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("***", "response is not base64"),
        ("*", "response is not base64"),  # an initial response is never a cancel
        (b64(b"a\0b"), "LOGIN response contains NUL"),
        (b64(b"\xff"), "LOGIN response is not UTF-8"),
        (b64(b"x" * 256), "LOGIN response too long"),
    ],
)
def test_login_errors(token: str, reason: str) -> None:
    malformed = Fail(FailKind.MALFORMED, reason)
    assert exchange("LOGIN").initial(token) == malformed  # the name, sent at once
    asked = exchange("LOGIN")
    asked.initial(None)
    if token != "*":
        assert asked.respond(token) == malformed  # the name, asked for
    named = exchange("LOGIN")
    named.initial(b64(b"bob"))
    if token != "*":
        assert named.respond(token) == malformed  # the password


# --- cancel (RFC 4954 §4, RFC 5034 §4) ---------------------------------------------


@pytest.mark.parametrize("line", ["*", " * ", "*\r"])
def test_star_in_answer_to_any_challenge_cancels(line: str) -> None:
    assert plain_answered(line) == CANCELLED
    sasl = exchange("LOGIN")
    sasl.initial(None)
    assert sasl.respond(line) == CANCELLED
    sasl = exchange("LOGIN")
    sasl.initial(b64(b"bob"))
    assert sasl.respond(line) == CANCELLED


def test_only_a_lone_star_cancels() -> None:
    assert plain_answered("Kg==") == Fail(FailKind.MALFORMED, SHAPE)  # base64 of "*"
    assert plain_answered("**") == NOT_BASE64


# --- the exchange's own sequence ----------------------------------------------------


def test_an_exchange_begins_once_and_answers_only_challenges() -> None:
    sasl = exchange("PLAIN")
    with pytest.raises(RuntimeError):
        sasl.respond(b64(b"\0bob\0pw"))  # nothing was asked yet
    sasl.initial(b64(b"\0bob\0pw"))
    with pytest.raises(RuntimeError):
        sasl.initial(None)
    with pytest.raises(RuntimeError):
        sasl.respond("*")  # it is over: nothing to cancel


@pytest.mark.parametrize("end", ["*", "!!", b64(b"\0bob\0pw")])
def test_nothing_follows_the_end_of_an_exchange(end: str) -> None:
    sasl = exchange("PLAIN")
    sasl.initial(None)
    assert not isinstance(sasl.respond(end), Challenge)
    with pytest.raises(RuntimeError):
        sasl.respond(b64(b"\0bob\0pw"))


class ThreeSteps:
    """A mechanism of the shape SCRAM has: server-first data, a final message."""

    def __init__(self) -> None:
        self.seen: list[bytes | None] = []

    def step(self, response: bytes | None) -> Outcome:
        self.seen.append(response)
        if len(self.seen) == 1:
            return Challenge(b"")
        if len(self.seen) == 2:
            return Challenge(b"r=nonce,s=salt,i=4096")
        if response != b"proof":
            raise SaslError("bad proof")
        return Done("bob", "")


def test_a_mechanism_is_a_class_with_step() -> None:
    mechanism = ThreeSteps()
    sasl = SaslExchange(mechanism)
    assert sasl.initial(None) == Challenge(b"")
    assert sasl.respond(b64(b"n,,n=bob,r=nonce")) == Challenge(b"r=nonce,s=salt,i=4096")
    assert sasl.respond(b64(b"proof")) == Done("bob", "")
    assert mechanism.seen == [None, b"n,,n=bob,r=nonce", b"proof"]
    failing = SaslExchange(ThreeSteps())
    failing.initial(None)
    failing.respond(b64(b"n,,n=bob,r=nonce"))
    assert failing.respond(b64(b"forged")) == Fail(FailKind.MALFORMED, "bad proof")


def test_errors_are_value_errors() -> None:
    assert issubclass(SaslError, ValueError)


# --- any input ----------------------------------------------------------------------


@given(st.binary(max_size=120))
def test_challenge_base64_round_trips(data: bytes) -> None:
    assert base64.b64decode(Challenge(data).base64, validate=True) == data


@given(st.sampled_from(MECHANISMS), st.none() | st.text(max_size=200), st.text(max_size=200))
def test_any_text_gives_an_outcome(mechanism: str, initial: str | None, line: str) -> None:
    sasl = exchange(mechanism)
    outcome = sasl.initial(initial)
    assert isinstance(outcome, Challenge | Done | Fail)
    if isinstance(outcome, Challenge):
        assert isinstance(sasl.respond(line), Challenge | Done | Fail)


@given(st.binary(max_size=300))
def test_any_bytes_as_plain_give_done_or_fail(data: bytes) -> None:
    outcome = plain(b64(data))
    assert isinstance(outcome, Done | Fail)
    if isinstance(outcome, Done):
        assert outcome.authcid and outcome.password
        fields = (outcome.authzid, outcome.authcid, outcome.password)
        assert "\0".join(fields).encode() == data
