"""The DANE matcher (RFC 7672 §3.1, RFC 6698 §2.1): chains made here, records computed here."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from postoffice.dns.resolver import TlsaRecord
from postoffice.policy.dane import DanePolicy, name_matches, usable, verify

NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
DER = serialization.Encoding.DER


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(DER)

    @property
    def spki(self) -> bytes:
        return self.cert.public_key().public_bytes(
            DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    names: tuple[str, ...] = (),
    start: datetime.datetime = NOW - DAY,
    end: datetime.datetime = NOW + DAY,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False
        )
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return issue("test CA", ca=True)


@pytest.fixture(scope="module")
def leaf(ca: Issued) -> Issued:
    return issue("mx.example.test", ca, names=("mx.example.test",))


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_dane_ee_matches_key_or_certificate_by_every_matching_type(leaf: Issued) -> None:
    for record in (
        TlsaRecord(3, 1, 1, sha256(leaf.spki)),
        TlsaRecord(3, 1, 2, hashlib.sha512(leaf.spki).digest()),
        TlsaRecord(3, 1, 0, leaf.spki),
        TlsaRecord(3, 0, 1, sha256(leaf.der)),
    ):
        verdict = verify([record], [leaf.der], ["mx.example.test"], NOW)
        assert verdict.ok, (record, verdict.detail)


def test_dane_ee_ignores_names_and_dates(ca: Issued) -> None:
    # RFC 7672 §3.1.1: the TLSA record binds the key; names and expiry do not matter.
    old = issue("elsewhere.test", ca, end=NOW - 10 * DAY, start=NOW - 20 * DAY)
    assert verify([TlsaRecord(3, 1, 1, sha256(old.spki))], [old.der], ["mx.example.test"], NOW).ok


def test_dane_ee_mismatch_fails(leaf: Issued, ca: Issued) -> None:
    verdict = verify([TlsaRecord(3, 1, 1, sha256(ca.spki))], [leaf.der, ca.der], ["x"], NOW)
    assert not verdict.ok and "no match" in verdict.detail


def test_any_matching_record_authenticates(leaf: Issued) -> None:
    records = [TlsaRecord(3, 1, 1, b"\0" * 32), TlsaRecord(3, 1, 1, sha256(leaf.spki))]
    assert verify(records, [leaf.der], [], NOW).ok


def test_dane_ta_anchors_the_chain_and_checks_the_name(leaf: Issued, ca: Issued) -> None:
    chain = [leaf.der, ca.der]
    for record in (TlsaRecord(2, 0, 1, sha256(ca.der)), TlsaRecord(2, 1, 1, sha256(ca.spki))):
        assert verify([record], chain, ["mx.example.test"], NOW).ok
        wrong = verify([record], chain, ["other.example.test"], NOW)
        assert not wrong.ok and "not for other.example.test" in wrong.detail


def test_dane_ta_never_matches_the_leaf_itself(leaf: Issued) -> None:
    verdict = verify([TlsaRecord(2, 1, 1, sha256(leaf.spki))], [leaf.der], ["mx.example.test"], NOW)
    assert not verdict.ok


def test_dane_ta_refuses_an_expired_leaf(ca: Issued) -> None:
    old = issue("mx", ca, names=("mx.example.test",), start=NOW - 9 * DAY, end=NOW - DAY)
    record = TlsaRecord(2, 1, 1, sha256(ca.spki))
    verdict = verify([record], [old.der, ca.der], ["mx.example.test"], NOW)
    assert not verdict.ok and "validity" in verdict.detail


def test_dane_ta_refuses_a_leaf_the_anchor_did_not_sign(ca: Issued) -> None:
    impostor_ca = issue("test CA", ca=True)  # same name, other key
    forged = issue("mx", impostor_ca, names=("mx.example.test",))
    record = TlsaRecord(2, 1, 1, sha256(ca.spki))
    verdict = verify([record], [forged.der, ca.der], ["mx.example.test"], NOW)
    assert not verdict.ok and "not signed" in verdict.detail


def test_dane_ta_through_an_intermediate(ca: Issued) -> None:
    mid = issue("intermediate", ca, ca=True)
    end = issue("mx", mid, names=("*.example.test",))
    chain = [end.der, mid.der, ca.der]
    assert verify([TlsaRecord(2, 1, 1, sha256(ca.spki))], chain, ["mx.example.test"], NOW).ok
    not_ca = issue("not a ca", ca)
    bad = issue("mx", not_ca, names=("mx.example.test",))
    verdict = verify(
        [TlsaRecord(2, 1, 1, sha256(ca.spki))],
        [bad.der, not_ca.der, ca.der],
        ["mx.example.test"],
        NOW,
    )
    assert not verdict.ok and "not a CA" in verdict.detail


def test_unusable_records_are_ignored(leaf: Issued) -> None:
    digest = sha256(leaf.spki)
    records = [
        TlsaRecord(0, 1, 1, digest),  # PKIX-TA: not for SMTP (RFC 7672 §3.1.3)
        TlsaRecord(1, 1, 1, digest),  # PKIX-EE: likewise
        TlsaRecord(3, 2, 1, digest),  # unknown selector
        TlsaRecord(3, 1, 3, digest),  # unknown matching type
        TlsaRecord(3, 1, 1, digest[:31]),  # SHA-256 digest of the wrong length
        TlsaRecord(3, 1, 0, b""),
    ]
    assert usable(records) == []
    verdict = verify(records, [leaf.der], [], NOW)
    assert not verdict.ok and verdict.detail == "no usable TLSA records"
    assert usable([*records, TlsaRecord(3, 1, 1, digest)]) == [TlsaRecord(3, 1, 1, digest)]


def test_policy_without_usable_records_only_asks_for_encryption(leaf: Issued) -> None:
    # RFC 7672 §2.2: TLS is still mandatory (the caller's job), nothing to authenticate.
    assert DanePolicy("mx.example.test", ()).check([leaf.der], NOW).ok
    assert (
        not DanePolicy("mx.example.test", (TlsaRecord(3, 1, 1, b"\0" * 32),))
        .check([leaf.der], NOW)
        .ok
    )


def test_no_certificate_or_garbage_fails_cleanly() -> None:
    record = TlsaRecord(3, 1, 1, b"\0" * 32)
    assert not verify([record], [], [], NOW).ok
    assert "unreadable" in verify([record], [b"not DER"], [], NOW).detail


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("mx.example.test", "MX.Example.Test.", True),
        ("*.example.test", "mx.example.test", True),
        ("*.example.test", "a.mx.example.test", False),  # one label only
        ("*.example.test", "example.test", False),
        ("*.test", "example.test", False),  # not a whole registrable suffix
        ("m*.example.test", "mx.example.test", False),  # partial wildcards are not honoured
    ],
)
def test_names(ca: Issued, pattern: str, name: str, ok: bool) -> None:
    cert = issue("x", ca, names=(pattern,)).cert
    assert name_matches(cert, name) is ok


def test_subject_cn_counts_only_without_dns_names(ca: Issued) -> None:
    assert name_matches(issue("mx.example.test", ca).cert, "mx.example.test")
    assert not name_matches(issue("mx.example.test", ca, names=("b.test",)).cert, "mx.example.test")


@given(
    usage=st.integers(0, 255),
    selector=st.integers(0, 255),
    mtype=st.integers(0, 255),
    data=st.binary(max_size=80),
)
def test_no_record_from_chance_matches_and_none_raises(
    usage: int, selector: int, mtype: int, data: bytes
) -> None:
    # A fixed leaf, any record: the verdict is an answer, never an exception,
    # and random data never authenticates it.
    record = TlsaRecord(usage, selector, mtype, data)
    verdict = verify([record], [_LEAF.der, _CA.der], ["mx.example.test"], NOW)
    assert not verdict.ok


_CA = issue("fixed CA", ca=True)
_LEAF = issue("mx.example.test", _CA, names=("mx.example.test",))
