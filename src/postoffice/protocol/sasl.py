"""SASL decoding for SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034).

Pure helpers: the session keeps the exchange, this module only turns the
client's base64 lines into strings and challenges into base64.  Mechanisms:
PLAIN (RFC 4616) and the de-facto LOGIN (draft-murchison-sasl-login).
"""

from __future__ import annotations

import binascii

# RFC 4616 §2: each of authzid, authcid and passwd is at most 255 octets.
MAX_FIELD = 255
CANCEL = "*"  # RFC 4954 §4: the client cancels the exchange


class SaslError(ValueError):
    """A client response that cannot be decoded; the message is safe to show."""


def is_cancel(line: str) -> bool:
    """True for the ``*`` line with which a client aborts the exchange."""
    return line.strip() == CANCEL


def decode_base64(text: str) -> bytes:
    """Strict base64 (RFC 4648 §4, no line breaks); ``=`` alone is empty (RFC 4954 §4)."""
    text = text.strip(" ")
    if text in ("", "="):
        return b""
    if not text.isascii():
        raise SaslError("response is not base64")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("response is not base64") from exc


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError(f"{what} is not UTF-8") from exc


def decode_plain(b64: str) -> tuple[str, str, str]:
    """Decode a PLAIN response: ``[authzid] NUL authcid NUL passwd`` (RFC 4616 §2).

    Returns (authzid, authcid, password); authzid is "" when absent.
    """
    parts = decode_base64(b64).split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    if not authcid or not password:
        raise SaslError("PLAIN response needs a user name and a password")
    if any(len(part) > MAX_FIELD for part in parts):
        raise SaslError("PLAIN response field too long")
    return _utf8(authzid, "authzid"), _utf8(authcid, "user name"), _utf8(password, "password")


def decode_login_step(b64: str) -> str:
    """Decode one LOGIN response (the user name, then the password)."""
    data = decode_base64(b64)
    if len(data) > MAX_FIELD:
        raise SaslError("LOGIN response too long")
    if b"\0" in data:
        raise SaslError("LOGIN response contains NUL")
    return _utf8(data, "LOGIN response")


def encode_challenge(text: str) -> str:
    """Base64 of ``text`` in UTF-8, for a ``334`` reply ("" stays "")."""
    return binascii.b2a_base64(text.encode("utf-8"), newline=False).decode("ascii")
