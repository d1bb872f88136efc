"""Mail addresses: parsing SMTP paths, normalising domains, validating local parts.

Every address that reaches storage or a filesystem path passes through here.
Two different strictnesses are deliberate:

* ``parse_path`` accepts what RFC 5321 §4.1.2 allows on the wire (dot-atoms,
  quoted strings, source routes, UTF-8 under SMTPUTF8), so a peer's legal
  syntax is not refused as a syntax error;
* ``mailbox_local_part`` is what a *local account* may be named: a small
  ASCII alphabet that is always safe as one path component.  A wire address
  whose local part is quoted, or carries ``%``, ``!``, ``/`` or a NUL, simply
  never matches an account, so the relay decision never has to interpret
  those old routing conventions (the ``%`` hack, bang paths).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1: what an account name may have
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3
# On the wire a local part is bounded only by the path (MAX_PATH): RFC 5321
# §4.5.3.1 asks for no limits where possible, and the return paths of
# forwarders (SRS) and mailing lists (VERP) often pass 64 octets; Postfix and
# Exim take them.  Account names keep the 64 of §4.5.3.1.1.
MAX_WIRE_LOCAL_PART = MAX_PATH - 4  # "<" + local + "@" + one-letter domain + ">"


class AddressError(ValueError):
    """An address that is not valid; the message is safe to show to a client."""


@dataclass(frozen=True, slots=True)
class Address:
    """A normalised mailbox address.

    ``domain`` is lower case and in ASCII (IDNA A-labels), or an address
    literal such as ``[192.0.2.1]``.  ``local`` keeps the case it was given
    (RFC 5321 §2.4: local parts may be case-sensitive); account lookups
    lower-case it themselves.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")


# RFC 5322 atext, as RFC 5321 §4.1.2 uses it for Atom.  The "-" is escaped:
# this text is pasted into character classes, where a bare "-" before the
# UTF-8 range below would silently turn into a range of its own.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# Under SMTPUTF8 (RFC 6531 §3.3) atext is extended with any non-ASCII UTF-8
# character.  Surrogates are not characters: they are what undecodable bytes
# become under "surrogateescape", i.e. invalid UTF-8 on the wire.
_NON_ASCII = r"\u0080-\ud7ff\ue000-\U0010ffff"
_DOT_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_ATOM_UTF8 = re.compile(rf"[{_ATEXT}{_NON_ASCII}]+(?:\.[{_ATEXT}{_NON_ASCII}]+)*")
# Quoted-string: printable ASCII except " and \, or a backslash pair.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"')
_QUOTED_PAIR = re.compile(r"\\(.)")
_QUOTE_NEEDED = re.compile(r'["\\]')
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# What a local account may be called: always one safe path component.
_MAILBOX_LOCAL = re.compile(r"[a-z0-9](?:[a-z0-9_-]|\.(?!\.))*")


def _octets(text: str) -> int:
    """Length in UTF-8 octets.  Strings decoded from the wire may hold lone
    surrogates (surrogateescape); they are counted, not allowed to crash."""
    return len(text.encode("utf-8", "surrogatepass"))


def normalise_domain(text: str) -> str:
    """Return ``text`` as a lower-case ASCII domain, IDNA-encoded; raise AddressError.

    Address literals (``[1.2.3.4]``, ``[IPv6:...]``) are returned in a
    canonical form.
    """
    if not text:
        raise AddressError("empty domain")
    if text.startswith("["):
        return _normalise_literal(text)
    if text.endswith("."):
        raise AddressError("domain must not end with a dot")
    ascii_domain = text.lower() if text.isascii() else _a_labels(text)
    if len(ascii_domain) > MAX_DOMAIN - 2:
        raise AddressError("domain too long")
    labels = ascii_domain.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AddressError(f"invalid domain label {label!r}")
    return ascii_domain


def _a_labels(text: str) -> str:
    """A domain with non-ASCII labels in A-labels, by IDNA 2008 (RFC 5891 §4)
    after the UTS #46 non-transitional mapping (case folding, full-width
    forms, ideographic full stops).  Not Python's ``encodings.idna``: that is
    IDNA 2003, which maps ``faß.de`` to ``fass.de``, a different domain with a
    different owner.  Labels that are ASCII already are left to the caller's
    LDH check, exactly as in an all-ASCII domain, so one label's validity
    never depends on its neighbours; a label IDNA 2008 disallows (symbols,
    joiners out of context, bidi rule violations) is an AddressError, which
    the SMTP core answers 501 5.1.3 (recipient) or 5.1.7 (sender).
    """
    try:
        mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        )
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise AddressError("domain is not a valid internationalised name (IDNA 2008)") from exc


def _normalise_literal(text: str) -> str:
    if not text.endswith("]"):
        raise AddressError("unterminated address literal")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError as exc:
        raise AddressError("invalid address literal") from exc


def parse_address(text: str, *, utf8: bool = False) -> Address:
    """Parse ``local@domain`` (no angle brackets) into a normalised Address."""
    at = text.rfind("@")
    if at <= 0 or at == len(text) - 1:
        raise AddressError("address must be local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    if _octets(local) > MAX_WIRE_LOCAL_PART:
        raise AddressError("local part too long")
    atom = _DOT_ATOM_UTF8 if utf8 else _DOT_ATOM_ASCII
    quoted = _QUOTED_UTF8 if utf8 else _QUOTED
    if not (atom.fullmatch(local) or quoted.fullmatch(local)):
        raise AddressError("invalid local part")
    if not utf8 and not domain.isascii():
        raise AddressError("non-ASCII address needs SMTPUTF8")
    return Address(local, normalise_domain(domain))


def parse_path(text: str, *, utf8: bool = False) -> Address | None:
    """Parse an SMTP Reverse-path or Forward-path, angle brackets included.

    ``<>`` (the null reverse-path) gives ``None``.  A source route
    (``<@relay1,@relay2:user@domain>``) is accepted and ignored, as RFC 5321
    §4.1.1.3 and Appendix C ask: the route never influences where mail goes.
    """
    if _octets(text) > MAX_PATH:
        raise AddressError("path too long")
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        return None
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("malformed source route")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise AddressError("malformed source route")
            normalise_domain(hop[1:])
        inner = inner[colon + 1 :]
    return parse_address(inner, utf8=utf8)


def unquote_local_part(local: str) -> str:
    """The text a local part stands for: a quoted string's content with its
    backslash pairs undone (RFC 5321 §4.1.2), anything else as it is.
    ``"someone"`` and ``someone`` name the same mailbox (RFC 5322 §3.4.1)."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def format_local_part(text: str) -> str:
    """``text`` written as a local part: as a dot-atom if it is one, else as a
    quoted string (``"`` and ``\\`` escaped).  The inverse of
    ``unquote_local_part`` for text of printable characters."""
    atom = _DOT_ATOM_ASCII if text.isascii() else _DOT_ATOM_UTF8
    if atom.fullmatch(text):
        return text
    return '"' + _QUOTE_NEEDED.sub(r"\\\g<0>", text) + '"'


def mailbox_local_part(local: str) -> str:
    """Return the account name for ``local`` (lower-cased), or raise AddressError.

    The result matches ``[a-z0-9][a-z0-9._-]*`` with no ``..`` and no trailing
    dot, at most 64 characters: safe as a single path component, so it can
    name a Maildir directory without any further escaping.
    """
    name = local.lower()
    if len(name) > MAX_LOCAL_PART or not name.isascii():
        raise AddressError("mailbox names are ASCII, at most 64 characters")
    if not _MAILBOX_LOCAL.fullmatch(name) or name.endswith("."):
        raise AddressError(
            "mailbox names use a-z, 0-9, '.', '_' and '-', start with a letter or digit,"
            " and have no '..' or trailing '.'"
        )
    return name


def parse_mailbox(text: str) -> Address:
    """Parse an address that names (or will name) a local account or alias.

    Used by the CLI and the account store: the local part is reduced to its
    account form and the domain to A-labels.
    """
    addr = parse_address(text.strip(), utf8=True)
    if addr.is_literal:
        raise AddressError("a mailbox needs a domain name, not an address literal")
    return Address(mailbox_local_part(addr.local), addr.domain)


def split_plus(local: str, separator: str = "+") -> str:
    """``alice+tag`` -> ``alice`` (plus-addressing); unchanged without a separator."""
    head, sep, _tag = local.partition(separator)
    return head if sep and head else local
