"""MTA-STS TXT records, policy files and MX patterns (RFC 8461 §3.1, §3.2, §4.1),
and the order that picks a delivery's TLS policy (delivery/tls_policy.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.delivery.mta_sts import (
    StsPolicy,
    StsPolicyError,
    mx_matches,
    parse_policy,
    parse_txt,
)
from postoffice.delivery.mta_sts_fetch import StsLookup
from postoffice.delivery.tls_policy import decide
from postoffice.policy.dane import DanePolicy

GOOD = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


def test_policy_fields_and_text() -> None:
    policy = parse_policy(GOOD)
    assert policy == StsPolicy(
        "enforce",
        86400,
        ("mx1.example.test", "*.example.net"),
        (
            "version: STSv1",
            "mode: enforce",
            "mx: mx1.example.test",
            "mx: *.example.net",
            "max_age: 86400",
        ),
    )


def test_lf_line_ends_whitespace_and_unknown_keys() -> None:
    policy = parse_policy(
        b"version:STSv1\nmode:   testing\nmx: MX.Example.TEST\nmax_age: 0\nfuture_key: x y"
    )
    assert (policy.mode, policy.max_age, policy.mx) == ("testing", 0, ("mx.example.test",))


@pytest.mark.parametrize(
    "body",
    [
        b"mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        b"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        b"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a.test\n",  # no max_age
        b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",  # over a year
        b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx outside mode none
        b"version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\n",  # twice
        b"version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",  # wildcard inside
        b"version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx a.test\nmax_age: 1\n",  # no colon
        b"version: STSv1\nmode: enforce\n\nmx: a.test\nmax_age: 1\n",  # empty line
        b"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n\xff: x\n",  # not ASCII
        b"<html>not a policy</html>",
    ],
)
def test_invalid_policies_are_refused(body: bytes) -> None:
    with pytest.raises(StsPolicyError):
        parse_policy(body)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 60\n").mx == ()


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=abc; ext=value"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # others discarded (§3.1)
        (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two: no policy
        (["v=STSv1; id=a-b"], None),  # id is letters and digits
        (["v=STSv1; id=" + "a" * 33], None),  # at most 32
        (["v=STSv1; id=a; id=b"], None),
        (["v=STSv1;"], None),  # no id
        (["v=STSv1 id=abc"], None),
        ([], None),
    ],
)
def test_txt_record(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.example.test", "mx.example.test", True),
        ("mx.example.test", "MX.Example.Test.", True),
        ("mx.example.test", "mx2.example.test", False),
        ("*.example.test", "mx.example.test", True),
        ("*.example.test", "example.test", False),  # §4.1: one label exactly
        ("*.example.test", "a.mx.example.test", False),
        ("*.example.test", ".example.test", False),
        ("*.example.test", "mx.example.test.evil", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_HOST = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)


@given(st.binary(max_size=400))
def test_parser_never_fails_otherwise(body: bytes) -> None:
    try:
        policy = parse_policy(body)
    except StsPolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.max_age <= 31_557_600


@given(
    st.sampled_from(["enforce", "testing"]),
    st.integers(0, 31_557_600),
    st.lists(st.tuples(st.booleans(), _HOST), min_size=1, max_size=5),
    st.sampled_from(["\n", "\r\n"]),
)
def test_written_policies_read_back(
    mode: str, age: int, mx: list[tuple[bool, str]], end: str
) -> None:
    patterns = [("*." if wild else "") + host for wild, host in mx]
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {p}" for p in patterns), f"max_age: {age}"]
    policy = parse_policy(end.join(lines).encode() + end.encode())
    assert (policy.mode, policy.max_age, policy.mx) == (mode, age, tuple(patterns))
    for wild, host in mx:
        assert policy.allows("mx0." + host if wild else host)


@given(st.lists(st.text(max_size=60), max_size=3))
def test_txt_parser_total(records: list[str]) -> None:
    result = parse_txt(records)
    assert result is None or (result.isalnum() and len(result) <= 32)


def test_decision_order() -> None:
    sts = StsLookup(parse_policy(GOOD))
    unusable = DanePolicy("mx1.example.test", ())  # a secure RRset of unusable records
    chosen = decide("opportunistic", "example.test", sts, unusable)  # DANE wins
    assert (chosen.kind, chosen.enforce, chosen.policy_type) == ("dane", True, "tlsa")
    assert not chosen.verified  # encrypted, not authenticated: not enough for REQUIRETLS
    chosen = decide("opportunistic", "example.test", sts)
    assert (chosen.kind, chosen.enforce, chosen.verify, chosen.policy_type) == (
        "sts",
        True,
        True,
        "sts",
    )
    assert chosen.allows_mx("mx1.example.test") and not chosen.allows_mx("mx9.example.test")
    assert chosen.policy_strings[0] == "version: STSv1"
    testing = decide(
        "verify", "t.test", StsLookup(parse_policy(GOOD.replace(b"enforce", b"testing")))
    )
    assert testing.testing and testing.verified and not testing.enforce
    assert testing.strict().enforce  # REQUIRETLS (RFC 8689 §4.2.1)
    none = StsLookup(parse_policy(b"version: STSv1\nmode: none\nmax_age: 60\n"))
    assert decide("opportunistic", "n.test", none).kind == "opportunistic"
    verify = decide("verify", "v.test", StsLookup(None))
    assert (verify.enforce, verify.verify, verify.verified) == (True, True, True)
    only = decide("dane-only", "d.test", StsLookup(None))
    assert only.enforce and not only.verified
    plain = decide("opportunistic", "o.test", StsLookup(None, "sts-policy-fetch-error"))
    assert (plain.enforce, plain.verified, plain.failure) == (
        False,
        False,
        "sts-policy-fetch-error",
    )
    assert plain.policy_type == "no-policy-found"
