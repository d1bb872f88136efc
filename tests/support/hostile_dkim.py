"""DKIM keys and signatures an attacker publishes to make a verifier burn CPU.

Issue 11, item 4: a verifier that raises the signature to the published
public exponent does ``pow(s, e, n)``; with ``n`` and ``e`` both 16384 bits
that is seconds of CPU per signature, and CPython holds the GIL for all of
it.  The attacker needs no private key: the signature is random bytes, and
the body hash is correct, so the verifier gets as far as the exponentiation.

Used by tests/abuse/test_inbound_auth.py and bench/dkim_stall.py.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

from dkim.canonicalization import Relaxed


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


RSA_ENCRYPTION = bytes.fromhex("06092a864886f70d0101010500")  # OID 1.2.840.113549.1.1.1, NULL


def rsa_spki(n: int, e: int) -> bytes:
    """SubjectPublicKeyInfo DER of an RSA key (RFC 3279 §2.3.1), from raw
    integers: any modulus and exponent, as an attacker may publish them."""
    key = _der(0x30, _der_int(n) + _der_int(e))
    return _der(0x30, _der(0x30, RSA_ENCRYPTION) + _der(0x03, b"\x00" + key))


def hostile_key(bits: int, exponent: int | None = None) -> tuple[str, int]:
    """A DKIM key record (``v=DKIM1; k=rsa; p=...``) with an odd ``bits``-bit
    modulus and, unless given, an exponent just below it; and the modulus."""
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    e = exponent if exponent is not None else n - 2
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_spki(n, e)).decode("ascii"), n


def hostile_signatures(
    message: bytes, domain: str, selectors: list[str], modulus: int, signed: str = "from:to:subject"
) -> bytes:
    """DKIM-Signature fields (LF line ends) for ``message`` (LF form), one per
    selector: a correct body hash, and random bytes below ``modulus`` as b=."""
    body = message.split(b"\n\n", 1)[1] if b"\n\n" in message else b""
    canonical = Relaxed.canonicalize_body(body.replace(b"\n", b"\r\n"))
    bh = base64.b64encode(hashlib.sha256(canonical).digest()).decode("ascii")
    size = (modulus.bit_length() + 7) // 8
    fields = []
    for selector in selectors:
        signature = secrets.randbelow(modulus).to_bytes(size, "big")
        b64 = base64.b64encode(signature).decode("ascii")
        folded = "\n\t".join(b64[i : i + 72] for i in range(0, len(b64), 72))
        fields.append(
            f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; s={selector};\n"
            f"\th={signed}; bh={bh};\n\tb={folded}\n"
        )
    return "".join(fields).encode("ascii")
