"""DMARC records, organizational domains and alignment (RFC 7489), no DNS."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.mail.headers import header_block
from postoffice.policy.dmarc import (
    Authors,
    DmarcRecord,
    DmarcResult,
    aligned,
    authors,
    evaluate,
    is_dmarc_record,
    organizational_domain,
    parse_record,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v=DMARC1; p=reject", True),
        ("v = DMARC1 ;p=none", True),
        ("v=DMARC2; p=reject", False),
        ("p=reject; v=DMARC1", False),  # §6.3: v= must come first
        ("v=spf1 -all", False),
    ],
)
def test_is_dmarc_record(text: str, expected: bool) -> None:
    assert is_dmarc_record(text) is expected


def test_parse_record_tags_and_defaults() -> None:
    r = parse_record("v=DMARC1; p=Reject; sp=none; adkim=s; pct=50", "example.test")
    assert r == DmarcRecord("example.test", "reject", "none", adkim="s", aspf="r", pct=50)
    d = parse_record("v=DMARC1; p=quarantine; adkim=x; pct=abc", "example.test")
    assert d is not None and (d.subdomain_policy, d.adkim, d.pct) == ("quarantine", "r", 100)
    # §6.6.3 step 6: no valid p= ... unless rua= is there, then act as p=none.
    assert parse_record("v=DMARC1; p=bogus", "example.test") is None
    rua = parse_record("v=DMARC1; rua=mailto:d@example.test", "example.test")
    assert rua is not None and rua.policy == "none"


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("mail.example.test", "example.test"),
        ("example.test", "example.test"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_alignment_modes() -> None:
    assert aligned("news.example.test", "example.test", "r")
    assert not aligned("news.example.test", "example.test", "s")
    assert aligned("EXAMPLE.test", "example.test", "s")
    assert not aligned("example.co.uk", "other.co.uk", "r")


def test_authors_reads_a_folded_from_with_several_addresses() -> None:
    msg = b'From: "A, B" <a@One.test>,\n\tc@two.test\nTo: x@y.test\n\nFrom: body@not.test\n'
    assert authors(header_block(msg)) == Authors(("one.test", "two.test"))


def test_evaluate_pass_fail_and_subdomain_policy() -> None:
    record = DmarcRecord("example.test", "reject", "quarantine")
    ok = evaluate(record, "example.test", spf_pass_domain="example.test", dkim_pass_domains=[])
    assert ok.result is DmarcResult.PASS
    sub = evaluate(record, "news.example.test", spf_pass_domain=None, dkim_pass_domains=[])
    assert (sub.result, sub.policy) == (DmarcResult.FAIL, "quarantine")  # sp= applies
    rng = random.Random(1)
    half = DmarcRecord("example.test", "reject", "reject", pct=50)
    policies = {
        evaluate(half, "example.test", spf_pass_domain=None, dkim_pass_domains=[], rng=rng).policy
        for _ in range(50)
    }
    assert policies == {"reject", "quarantine"}  # §6.6.4 sampling


@pytest.mark.parametrize(
    ("from_lines", "domains", "problem"),
    [
        (b"From: <service@Paypal.Test.>\n", ("paypal.test",), ""),  # the root dot
        (b"From: a@one.test, b@two.test, c@three.test, d@paypal.test\n", None, ""),
        (b"From: a@one.test\n", ("one.test",), ""),
        (b"From: =?utf-8?q?Jos=C3=A9?= <jose@xn--bcher-kva.test>\n", ("xn--bcher-kva.test",), ""),
        (b"From: \xc3\xa9lise@b\xc3\xbccher.test\n", ("xn--bcher-kva.test",), ""),
        # Two parsers read this differently; each domain either finds is evaluated.
        (b"From: service@paypal.test <a@one.test>\n", ("paypal.test", "one.test"), ""),
        (b"Subject: none\n", (), "no From: field"),
        (b"From: a@one.test\nfrom: b@two.test\n", (), "2 From: fields"),
        (b"From: service\n", (), "without a usable domain"),
        (b"From: service@paypal.test..\n", (), "without a usable domain"),
        (b"From: a@[192.0.2.1]\n", (), "without a usable domain"),
        (b"From: undisclosed-recipients:;\n", (), "without a usable domain"),
        (b"From:\n", (), "no From: address"),
        (b"From: " + b", ".join(b"x@d%d.test" % i for i in range(6)) + b"\n", (), "more than 5"),
        (b"From: " + b"a" * 5000 + b"@one.test\n", (), "too long"),
    ],
)
def test_authors(from_lines: bytes, domains: tuple[str, ...] | None, problem: str) -> None:
    found = authors(header_block(from_lines + b"To: x@y.test\n\nbody\n"))
    assert problem in found.problem if problem else found.problem == ""
    # It goes into an SMTP reply and a header comment: ASCII (RFC 5321 §2.4).
    assert found.problem.isascii()
    if domains is not None:
        assert found.domains == domains
    elif not problem:
        assert "paypal.test" in found.domains  # the fourth address counts too


@given(st.text(max_size=200))
def test_authors_never_fails(value: str) -> None:
    block = b"From: " + value.replace("\n", " ").replace("\r", " ").encode() + b"\n"
    found = authors(block)
    assert bool(found.domains) != bool(found.problem)
