"""DKIM verification (RFC 6376, RFC 8463) with bounded work.

Verifying costs what the sender chooses: dkimpy raises the signature to the
public exponent published in the sender's DNS, in pure Python.  A key whose
modulus and exponent are both 16384 bits costs seconds per signature
(issue 11, item 4), and CPython holds the GIL for all of it.  So:

* ``key_problem`` refuses, before any modular exponentiation, RSA keys over
  4096 bits or under 1024 (RFC 8301 §3.2) and public exponents other than
  odd ones from 3 to 2^32 (65537 in practice); the checks read the very
  integers dkimpy would use (its own parser, on a record already bounded in
  length, since that parser is quadratic in the length of an integer);
* ``signature_problem`` refuses rsa-sha1 (RFC 8301 §3.1), signatures
  longer than a 4096-bit one and h= lists over ``MAX_SIGNED_FIELDS``
  (dkimpy's header selection is O(h= entries x header fields));
* at most ``MAX_SIGNATURES`` signatures per message are verified
  (RFC 6376 §6.1 lets verifiers limit the work);
* ``verify_job`` runs in a worker process (policy/cpu_workers.py) with a
  deadline of ``VERIFY_TIMEOUT`` seconds per message, so nothing here runs
  on the event loop, and work nobody foresaw is cut off too.

The server looks the keys up itself (``scan_signatures`` finds the names in
the header block, the resolver honours ``[relay] dns_servers``) and hands
the answers over; dkimpy does no DNS of its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import dkim
import dkim.canonicalization
import dkim.util

from postoffice.mail.headers import field_values

MAX_SIGNATURES = 5  # DKIM signatures verified per message
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers MUST NOT consider shorter keys valid
MAX_RSA_BITS = 4096  # RFC 8301 §3.2: verifiers must handle 1024..4096; larger MAY be refused
MAX_RSA_EXPONENT = 2**32
# Base64 characters of p=: a 4096-bit key with a 2^32 exponent in
# SubjectPublicKeyInfo is 550 octets (736 characters).
MAX_KEY_CHARACTERS = 800
MAX_SIGNATURE_CHARACTERS = 700  # b=: a 4096-bit signature is 684 characters
MAX_SIGNED_FIELDS = 256  # h= entries (real signers use a few dozen)
VERIFY_TIMEOUT = 10.0  # seconds of a worker process for all signatures of one message
VERIFY_WORKERS = 2  # worker processes (per smtp process)
TARGET = "postoffice.policy.dkim_verify:verify_job"
# RFC 8301 §3.1: rsa-sha1 MUST NOT be used for verifying; RFC 8463 adds Ed25519.
ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")

# dkimpy logs key problems at ERROR level; they are reported in the header instead.
_DKIMPY_LOG = logging.Logger("postoffice.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())
_DKIMPY_LOG.propagate = False


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    result: str  # pass, fail, neutral, permerror, temperror (RFC 8601 §2.7.1)
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""  # the first characters of b=, telling signatures apart (RFC 6008)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class KeyAnswer:
    """What the lookup of one key gave: a usable record, or a verdict."""

    record: str | None = None
    result: str = ""  # temperror or permerror when there is no usable record
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Signature:
    """One DKIM-Signature field as far as it can be read without verifying."""

    domain: str
    selector: str
    algorithm: str
    b: str
    problem: str = ""  # a permerror found before any lookup

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def verdict(self, result: str, reason: str = "") -> DkimVerdict:
        return DkimVerdict(result, self.domain, self.selector, self.algorithm, self.b, reason)


_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?")
_SPACE = re.compile(rb"\s+")


def is_name(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return 0 < len(text) < 254 and all(_NAME.fullmatch(label) for label in labels)


def signature_problem(tags: Mapping[bytes, bytes]) -> str:
    """Why a signature with these tags is refused unverified ("" if it is not)."""
    domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
    selector = tags.get(b"s", b"").decode("ascii", "replace").lower()
    if not (is_name(domain) and is_name(selector)):
        return "bad d= or s="
    algorithm = tags.get(b"a", b"").strip().lower()
    if algorithm not in ALGORITHMS:
        return f"algorithm {algorithm.decode('ascii', 'replace')[:20]} not allowed (RFC 8301)"
    if len(_SPACE.sub(b"", tags.get(b"b", b""))) > MAX_SIGNATURE_CHARACTERS:
        return f"signature longer than {MAX_RSA_BITS} bits"
    if tags.get(b"h", b"").count(b":") >= MAX_SIGNED_FIELDS:
        return f"more than {MAX_SIGNED_FIELDS} signed header fields"
    return ""


def read_signature(value: bytes) -> Signature:
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList as exc:
        return Signature("", "", "", "", f"bad tag list: {exc}")
    return Signature(
        domain=tags.get(b"d", b"").decode("ascii", "replace").lower(),
        selector=tags.get(b"s", b"").decode("ascii", "replace").lower(),
        algorithm=tags.get(b"a", b"").decode("ascii", "replace").lower(),
        b=_SPACE.sub(b"", tags.get(b"b", b"")).decode("ascii", "replace")[:8],
        problem=signature_problem(tags),
    )


def scan_signatures(header_block: bytes) -> list[Signature]:
    """The first MAX_SIGNATURES DKIM-Signature fields, read without dkimpy
    (linear in the header block, so fit for the event loop): which keys to
    look up, and what to report if verification cannot run."""
    values = field_values(header_block, "dkim-signature")[:MAX_SIGNATURES]
    return [read_signature(v) for v in values]


def key_record(records: list[str]) -> str | None:
    """RFC 6376 §3.6.2.2: of several TXT records, the one that is a key."""
    for text in records:
        if "p=" in text:
            return text
    return records[0] if records else None


def key_problem(record: str) -> str:
    """Why this key record must not be used ("" if it may): RFC 8301 key
    sizes and a small public exponent, read before any exponentiation."""
    try:
        tags = dkim.util.parse_tag_value(record.encode("ascii"))
    except (UnicodeEncodeError, dkim.util.InvalidTagValueList) as exc:
        return f"bad key record: {exc}"
    if len(_SPACE.sub(b"", tags.get(b"p", b""))) > MAX_KEY_CHARACTERS:
        return f"key longer than {MAX_RSA_BITS} bits (RFC 8301)"
    try:
        pk, _size, ktag, _tlsrpt = dkim.evaluate_pk(b"key", record)
    except Exception as exc:  # dkimpy on hostile input: KeyFormatError, binascii.Error, ...
        return f"bad key record: {type(exc).__name__}"
    if ktag != b"rsa":
        return ""  # Ed25519 (RFC 8463): a fixed 32-octet key, checked by the library
    bits = int(pk["modulus"]).bit_length()
    exponent = int(pk["publicExponent"])
    if bits < MIN_RSA_BITS:
        return f"RSA key of {bits} bits, under {MIN_RSA_BITS} (RFC 8301)"
    if bits > MAX_RSA_BITS:
        return f"RSA key of {bits} bits, over {MAX_RSA_BITS} (RFC 8301)"
    if exponent < 3 or exponent > MAX_RSA_EXPONENT or exponent % 2 == 0:
        return "RSA public exponent not allowed (odd, 3 to 2^32)"
    return ""


# --- in the worker process ---------------------------------------------------------------------
def _strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy's ``re.sub(b"[\\t ]+\\r\\n", b"\\r\\n", content)`` in linear time.
    The regex is quadratic in a run of blanks not followed by CRLF: a 40 KB
    run costs 1.4 s, a megabyte hours (relaxed body canonicalization)."""
    lines = content.split(b"\r\n")
    return b"\r\n".join([line.rstrip(b" \t") for line in lines[:-1]] + lines[-1:])


def _use_linear_canonicalization() -> None:
    # Relaxed.canonicalize_body looks the helper up in its module when called.
    dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace


def verify_message(message: bytes, keys: Mapping[str, KeyAnswer]) -> list[DkimVerdict]:
    """A verdict for each of the first MAX_SIGNATURES signatures of
    ``message``, with the keys looked up for it (by ``Signature.key_name``)."""
    _use_linear_canonicalization()
    try:
        d = dkim.DKIM(message, logger=_DKIMPY_LOG, minkey=MIN_RSA_BITS)
    except dkim.DKIMException:
        return []  # a header block dkimpy cannot parse: nothing it could verify
    fields = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    verdicts = []
    for index, value in enumerate(fields[:MAX_SIGNATURES]):
        sig = read_signature(value)
        verdicts.append(_verify_one(d, index, sig, keys.get(sig.key_name)))
    return verdicts


def unverified(sig: Signature, key: KeyAnswer | None) -> DkimVerdict | None:
    """The verdict of a signature that is not to be verified (its own problem,
    or no usable key); None when it is to be verified."""
    if sig.problem:
        return sig.verdict("permerror", sig.problem)
    if key is None:
        return sig.verdict("permerror", "key not looked up")
    if key.record is None:
        return sig.verdict(key.result or "permerror", key.reason)
    return None


def _verify_one(d: dkim.DKIM, index: int, sig: Signature, key: KeyAnswer | None) -> DkimVerdict:
    refused = unverified(sig, key)
    if refused is not None:
        return refused
    assert key is not None and key.record is not None  # what unverified() let through
    problem = key_problem(key.record)  # checked by the server already; cheap, and final here
    if problem:
        return sig.verdict("permerror", problem)
    record = key.record.encode("ascii")

    def dnsfunc(_name: bytes, timeout: float = 5) -> bytes:
        return record

    try:
        ok = d.verify(index, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        text = str(exc)
        return sig.verdict("fail", "body hash did not verify" if "body hash" in text else text)
    except dkim.KeyFormatError as exc:
        return sig.verdict("permerror", str(exc))
    except dkim.DKIMException as exc:
        return sig.verdict("neutral", f"signature not usable: {exc}")
    except Exception as exc:  # dkimpy on hostile input: ValueError, IndexError, ...
        return sig.verdict("permerror", f"signature not usable: {type(exc).__name__}")
    return sig.verdict("pass") if ok else sig.verdict("fail", "signature did not verify")


def verify_job(header: bytes, payload: bytes) -> bytes:
    """The worker's entry point (policy/cpu_workers.py): ``header`` is the
    JSON of the key answers by name, ``payload`` the message; the answer is
    the JSON list of verdicts."""
    keys = {name: KeyAnswer(**answer) for name, answer in json.loads(header).items()}
    return json.dumps([asdict(v) for v in verify_message(payload, keys)]).encode("utf-8")


def encode_keys(keys: Mapping[str, KeyAnswer]) -> bytes:
    return json.dumps({name: asdict(answer) for name, answer in keys.items()}).encode("utf-8")


def decode_verdicts(answer: bytes) -> list[DkimVerdict]:
    return [DkimVerdict(**item) for item in json.loads(answer)]
