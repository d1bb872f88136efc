"""Bounded DKIM verification (policy/dkim_verify.py): hostile keys and
signatures are refused before dkimpy exponentiates anything (RFC 8301)."""

from __future__ import annotations

import re
from pathlib import Path

import dkim.canonicalization
import pytest
from hypothesis import given
from hypothesis import strategies as st

from postoffice.mail.headers import header_block
from postoffice.policy.dkim_keys import KeyStore, generate, txt_record
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.dkim_verify import (
    MAX_SIGNATURES,
    MAX_SIGNED_FIELDS,
    KeyAnswer,
    _strip_trailing_whitespace,
    key_problem,
    scan_signatures,
    verify_message,
)
from tests.support.hostile_dkim import hostile_key, hostile_signatures

MESSAGE = (
    b"From: CEO <ceo@evil.test>\nTo: bob@receiver.test\nSubject: pay\n"
    b"Date: Mon, 06 Jan 2025 10:00:00 +0000\n\nPay now.\n"
)


@pytest.mark.parametrize(
    ("bits", "exponent", "problem"),
    [
        (16384, None, "key longer than 4096 bits"),  # the attack: n and e of 16384 bits
        (8192, 65537, "key longer than 4096 bits"),
        (4097, 65537, "RSA key of 4097 bits, over 4096"),
        (1023, 65537, "RSA key of 1023 bits, under 1024"),
        (512, 3, "under 1024"),
        (2048, 2**64 + 1, "exponent not allowed"),
        (2048, 2**32 + 1, "exponent not allowed"),
        (2048, 1, "exponent not allowed"),
        (2048, 65536, "exponent not allowed"),
        (2048, 65537, ""),
        (1024, 3, ""),
        (4096, 2**32 - 1, ""),
    ],
)
def test_key_sizes_and_exponents(bits: int, exponent: int | None, problem: str) -> None:
    record, _n = hostile_key(bits, exponent)
    found = key_problem(record)
    assert (problem in found) if problem else found == "", found


def test_broken_key_records_are_problems() -> None:
    assert "bad key record" in key_problem("v=DKIM1; k=rsa; p=AAAA")
    assert "bad key record" in key_problem("v=DKIM2; p=MIIB")
    assert "bad key record" in key_problem("p=\u00e9")
    assert key_problem("v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=") == ""


def sign(tmp_path: Path, message: bytes) -> tuple[bytes, dict[str, KeyAnswer]]:
    """``message`` signed by sender.test's RSA and Ed25519 keys, and those keys."""
    keys = generate(tmp_path, "sender.test")
    signed = DkimSigner(KeyStore(tmp_path)).sign_blocking(message) + message
    return signed, {k.dns_name: KeyAnswer(txt_record(k)) for k in keys}


def test_genuine_signatures_pass(tmp_path: Path) -> None:
    signed, keys = sign(tmp_path, MESSAGE.replace(b"evil.test", b"sender.test"))
    assert [v.result for v in verify_message(signed, keys)] == ["pass", "pass"]


def test_hostile_keys_are_refused_even_when_handed_to_the_verifier() -> None:
    # The server refuses such keys before the worker; the worker checks again.
    record, n = hostile_key(8192)
    signed = hostile_signatures(MESSAGE, "evil.test", ["s0", "s1"], n) + MESSAGE
    keys = {f"s{i}._domainkey.evil.test": KeyAnswer(record) for i in range(2)}
    verdicts = verify_message(signed, keys)
    assert [v.result for v in verdicts] == ["permerror", "permerror"]
    assert all("longer than 4096 bits" in v.reason for v in verdicts)
    large_e, n2 = hostile_key(2048, 2**64 + 1)
    signed = hostile_signatures(MESSAGE, "evil.test", ["s0"], n2) + MESSAGE
    [verdict] = verify_message(signed, {"s0._domainkey.evil.test": KeyAnswer(large_e)})
    assert (verdict.result, verdict.reason) == ("permerror", key_problem(large_e))


def test_signature_longer_than_4096_bits_is_refused() -> None:
    record, _n = hostile_key(2048, 65537)
    _other, n = hostile_key(8192, 65537)  # b= as long as an 8192-bit signature
    signed = hostile_signatures(MESSAGE, "evil.test", ["s0"], n) + MESSAGE
    [verdict] = verify_message(signed, {"s0._domainkey.evil.test": KeyAnswer(record)})
    assert (verdict.result, verdict.reason) == ("permerror", "signature longer than 4096 bits")


def test_too_many_signed_fields_are_refused() -> None:
    record, n = hostile_key(2048, 65537)
    names = ":".join(f"x-{i}" for i in range(MAX_SIGNED_FIELDS + 1))
    signed = hostile_signatures(MESSAGE, "evil.test", ["s0"], n, signed=names) + MESSAGE
    [verdict] = verify_message(signed, {"s0._domainkey.evil.test": KeyAnswer(record)})
    assert verdict.reason == f"more than {MAX_SIGNED_FIELDS} signed header fields"
    ok = ":".join(f"x-{i}" for i in range(MAX_SIGNED_FIELDS))
    signed = hostile_signatures(MESSAGE, "evil.test", ["s0"], n, signed=ok) + MESSAGE
    [verdict] = verify_message(signed, {"s0._domainkey.evil.test": KeyAnswer(record)})
    assert verdict.result == "fail"  # verified (random bytes do not verify)


def test_at_most_max_signatures_are_read_and_verified() -> None:
    record, n = hostile_key(2048, 65537)
    selectors = [f"s{i}" for i in range(MAX_SIGNATURES + 3)]
    signed = hostile_signatures(MESSAGE, "evil.test", selectors, n) + MESSAGE
    keys = {f"{s}._domainkey.evil.test": KeyAnswer(record) for s in selectors}
    scanned = scan_signatures(header_block(signed))
    assert [s.selector for s in scanned] == selectors[:MAX_SIGNATURES]
    verdicts = verify_message(signed, keys)
    assert [v.selector for v in verdicts] == selectors[:MAX_SIGNATURES]
    assert {v.result for v in verdicts} == {"fail"}


def test_missing_and_failed_keys_keep_their_verdicts() -> None:
    _record, n = hostile_key(2048, 65537)
    signed = hostile_signatures(MESSAGE, "evil.test", ["a", "b", "c"], n) + MESSAGE
    keys = {
        "a._domainkey.evil.test": KeyAnswer(result="temperror", reason="key lookup failed"),
        "b._domainkey.evil.test": KeyAnswer(result="permerror", reason="no key for signature"),
    }
    verdicts = verify_message(signed, keys)
    assert [(v.result, v.reason) for v in verdicts] == [
        ("temperror", "key lookup failed"),
        ("permerror", "no key for signature"),
        ("permerror", "key not looked up"),
    ]


_BLANKS = st.text(alphabet=" \t\r\nab", max_size=60).map(lambda t: t.encode())


@given(_BLANKS)
def test_linear_blank_stripping_equals_dkimpys_regex(body: bytes) -> None:
    assert _strip_trailing_whitespace(body) == re.sub(b"[\t ]+\r\n", b"\r\n", body)


def test_a_long_run_of_blanks_is_canonicalized_in_linear_time() -> None:
    # With dkimpy's regex a megabyte of blanks not followed by CRLF takes hours.
    body = b" " * 1_000_000 + b"x\r\n"
    canonical = dkim.canonicalization.Relaxed.canonicalize_body  # patched by verify_message
    verify_message(MESSAGE, {})
    assert canonical(body) == b" x\r\n"


def test_the_hand_made_key_encoding_is_what_cryptography_reads() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    from tests.support.hostile_dkim import rsa_spki

    n = (1 << 2047) | 12345
    key = load_der_public_key(rsa_spki(n, 65537))
    assert isinstance(key, rsa.RSAPublicKey)
    assert (key.public_numbers().n, key.public_numbers().e) == (n, 65537)


def test_rsa_sha1_is_not_verified() -> None:
    record, n = hostile_key(2048, 65537)
    signed = hostile_signatures(MESSAGE, "evil.test", ["s0"], n) + MESSAGE
    sha1 = signed.replace(b"a=rsa-sha256", b"a=rsa-sha1", 1)
    [verdict] = verify_message(sha1, {"s0._domainkey.evil.test": KeyAnswer(record)})
    assert (verdict.result, verdict.reason) == (
        "permerror",
        "algorithm rsa-sha1 not allowed (RFC 8301)",
    )


@given(
    st.lists(
        st.sampled_from(
            ["v=DKIM1", "k=rsa", "k=ed25519", "p=", "MIIB", "AAAA", "=", ";", " ", "s=*"]
        ),
        max_size=12,
    ).map("".join)
)
def test_key_problem_never_fails(record: str) -> None:
    assert isinstance(key_problem(record), str)
