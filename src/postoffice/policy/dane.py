"""DANE for SMTP (RFC 7672, RFC 6698): does the peer's certificate chain
match the MX host's TLSA records?  Pure: records, chain and time in, verdict out.

Only what RFC 7672 §3.1 lets an SMTP client use is "usable":

* usage 3, DANE-EE: the server's own certificate or key is pinned.  Names
  and dates are ignored (§3.1.1): the DNS binding is the authentication.
* usage 2, DANE-TA: a trust anchor (a certificate in the chain the server
  sends) is pinned.  The chain from the leaf up to it must be properly
  signed, the certificates below the anchor within their dates, and the
  leaf must carry a reference identifier: the MX host name (§3.2.2, §3.2.3).
* selector 0 (whole certificate) or 1 (SubjectPublicKeyInfo); matching type
  0 (exact), 1 (SHA-256) or 2 (SHA-512) with a digest of the right length.

Usages 0 and 1 (PKIX-TA/EE) are unusable for SMTP (§3.1.3), and so are
unknown parameters.  What to do when a secure TLSA RRset has no usable
record at all is the caller's (remote.py): TLS stays mandatory, but the
certificate cannot be authenticated (RFC 7672 §2.2).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from postoffice.dns.resolver import Resolver, TlsaRecord

DANE_TA, DANE_EE = 2, 3  # RFC 7218 mnemonics for the usages SMTP may use
CERT, SPKI = 0, 1  # selectors
_DIGEST_SIZE = {0: None, 1: 32, 2: 64}  # matching type -> digest length (None: any)


@dataclass(frozen=True, slots=True)
class DaneVerdict:
    """``ok``: the chain is authenticated; ``detail``: which record matched, or why not."""

    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class DanePolicy:
    """DANE applies to ``host``: STARTTLS is mandatory (RFC 7672 §2.2).
    ``records``: the usable TLSA records the certificate must match; none
    (a secure RRset of only unusable records) means TLS without authentication."""

    host: str
    records: tuple[TlsaRecord, ...]

    def check(self, chain: Sequence[bytes], now: datetime.datetime) -> DaneVerdict:
        """The verdict on the chain the server presented (blocking: crypto)."""
        if not self.records:
            return DaneVerdict(True, "TLSA records unusable: encrypted, not authenticated")
        return verify(self.records, chain, [self.host], now)


async def lookup(resolver: Resolver, host: str, port: int) -> DanePolicy | None:
    """The DANE policy for MX host ``host`` whose MX RRset was secure, or None
    (no DANE: opportunistic TLS as before).  The host's address records must
    be secure too (RFC 7672 §2.2.2: an insecure name gives no TLSA lookup), and
    its TLSA RRset at ``_<port>._tcp.<host>`` secure and not empty.  A failed
    lookup (a bogus answer is a SERVFAIL) raises DnsError: the host cannot be
    used for now (§2.2.2), since a downgrade would be undetectable."""
    _addresses, secure = await resolver.addresses_dnssec(host)
    if not secure:
        return None
    records, secure = await resolver.tlsa(host, port)
    if not secure or not records:
        return None
    return DanePolicy(host, tuple(usable(records)))


def usable(records: Sequence[TlsaRecord]) -> list[TlsaRecord]:
    """The records an SMTP client may use (RFC 7672 §3.1.3); the rest are ignored."""
    found = []
    for r in records:
        if r.usage not in (DANE_TA, DANE_EE) or r.selector not in (CERT, SPKI):
            continue
        if r.mtype not in _DIGEST_SIZE:
            continue
        size = _DIGEST_SIZE[r.mtype]
        if (size is not None and len(r.data) != size) or not r.data:
            continue  # a malformed digest can match nothing (RFC 7671 §5.4)
        found.append(r)
    return found


def describe(record: TlsaRecord) -> str:
    return f"TLSA {record.usage} {record.selector} {record.mtype}"


def verify(
    records: Sequence[TlsaRecord],
    chain: Sequence[bytes],
    names: Sequence[str],
    now: datetime.datetime,
) -> DaneVerdict:
    """Check ``chain`` (DER certificates, the server's first, as sent) against
    ``records``; ``names`` are the reference identifiers for usage 2 (the MX
    host name).  Any one usable record that matches authenticates (RFC 6698 §4.1)."""
    candidates = usable(records)
    if not candidates:
        return DaneVerdict(False, "no usable TLSA records")
    if not chain:
        return DaneVerdict(False, "the server sent no certificate")
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return DaneVerdict(False, f"unreadable certificate: {exc}")
    reasons: list[str] = []
    for record in candidates:
        if record.usage == DANE_EE:
            if _matches(record, certs[0]):
                return DaneVerdict(True, f"{describe(record)} matched the server's certificate")
            reasons.append(f"{describe(record)}: no match")
            continue
        for depth in range(1, len(certs)):
            if not _matches(record, certs[depth]):
                continue
            problem = _chain_problem(certs[: depth + 1], names, now)
            if problem is None:
                return DaneVerdict(True, f"{describe(record)} matched the trust anchor")
            reasons.append(f"{describe(record)}: {problem}")
            break
        else:
            reasons.append(f"{describe(record)}: no certificate in the chain matched")
    return DaneVerdict(False, "; ".join(reasons))


def _selected(record: TlsaRecord, cert: x509.Certificate) -> bytes:
    if record.selector == CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _matches(record: TlsaRecord, cert: x509.Certificate) -> bool:
    data = _selected(record, cert)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _chain_problem(
    path: Sequence[x509.Certificate], names: Sequence[str], now: datetime.datetime
) -> str | None:
    """Why ``path`` (leaf first, the pinned anchor last) does not hold, or None.

    The anchor's own dates are not checked: the TLSA record, not the
    certificate, is what makes it trusted (RFC 7671 §5.2.2)."""
    for depth, cert in enumerate(path[:-1]):
        issuer = path[depth + 1]
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return f"certificate {depth} is not signed by certificate {depth + 1}"
        if depth > 0 and not _is_ca(cert):
            return f"certificate {depth} is not a CA"
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return f"certificate {depth} is outside its validity dates"
    if not _is_ca(path[-1]) and len(path) > 1:
        return "the trust anchor is not a CA"
    if not any(name_matches(path[0], n) for n in names):
        return f"the server's certificate is not for {', '.join(names)}"
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def name_matches(cert: x509.Certificate, name: str) -> bool:
    """Does ``cert`` carry ``name``?  DNS names in subjectAltName, else the
    subject CN (RFC 7672 §3.2.3); a wildcard stands for exactly one whole
    leftmost label."""
    wanted = name.rstrip(".").lower()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        presented = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        presented = [
            str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    return any(_dns_match(p.rstrip(".").lower(), wanted) for p in presented)


def _dns_match(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    head, _dot, rest = name.partition(".")
    return bool(head) and rest == pattern[2:] and "." in rest
