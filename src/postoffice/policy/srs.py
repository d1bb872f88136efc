"""Sender Rewriting Scheme (SRS) for mail we forward off-site.

Why: an alias that forwards port-25 mail to another provider would keep the
original envelope sender, so the next hop's SPF check fails (RFC 7208 §1.1.3:
SPF breaks plain forwarding) and every refusal downstream bounces to whoever
the sender claimed to be.  Forwarded mail therefore leaves with an envelope
sender in our own domain that encodes the original one; bounces come back to
it, are checked (hash and age) and sent on to the original sender.  Mail to
an SRS address that we did not make, or made too long ago, is refused at
RCPT, so the scheme is not a relay for anyone who can type an address.

The format is Shevek's "Guarded" scheme as libsrs2 writes it:

    SRS0=HHHHHH=TT=orig.example=alice@our.example         (we are the first hop)
    SRS1=HHHHHH=hop1.example==HHHH=TT=orig.example=alice@our.example

``TT`` is the day (days since the epoch mod 1024) in two base-32 characters;
``HHHHHH`` the start of base64(HMAC-SHA1(secret, lowercase(TT + domain +
local))) for SRS0, of the first hop's host and opaque part for SRS1.  Like
libsrs2, hashes are compared without regard to case (some MTAs lower-case
addresses on the way), the input is lower-cased in ASCII only, SRS1 carries
no timestamp of ours (the first hop checks its own), and a time stamp from
the "future" counts as about 1024 days old.  Departures, both on the safe
side and invisible to other forwarders (only we ever check our hashes):
the hash is HASH_LENGTH (6) characters, not 4, which makes guessing one about
38^6 ~ 3e9 tries instead of 2e6 (case-insensitive base64 has ~38 symbols);
and a hash shorter than that is refused, never compared on its own length.

Written here rather than taken from PyPI: ``srslib`` (last release 2024,
after six quiet years) checks a hash only as long as the one in the address,
so a one-character hash passes one time in ~38 and anyone can forge an
address; it has no type information either.  ``pysrs`` was last released in
2018 and ports Perl Mail::SRS with its legacy schemes.  SRS is a hundred
lines; these are tested against the spec's examples of form and behaviour.

Secrets live in ``data_dir/srs_secrets`` (mode 0600), one per line: the
first signs, every line verifies, so a secret is rotated by putting a new
line on top and removing the old one after MAX_AGE_DAYS.  The file is made
with a random secret on first start.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from postoffice import logfmt
from postoffice.mail.address import (
    Address,
    AddressError,
    format_local_part,
    parse_path,
    unquote_local_part,
)
from postoffice.storage.safeio import fsync_dir, write_all

log = logging.getLogger("postoffice.srs")

SECRETS_FILE = "srs_secrets"
HASH_LENGTH = 6
MAX_AGE_DAYS = 21  # libsrs2's default: bounces later than this are refused
MIN_SECRET_LENGTH = 16  # characters of a secret line
_SEPARATORS = "=+-"  # what may follow SRS0/SRS1 (libsrs2); we write "="
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # the spec's time stamp alphabet
_DAY = 86400
_STAMP_CYCLE = 1024  # two base-32 characters


class SrsError(ValueError):
    """Not an SRS address of ours, or one that fails its checks; ``str()``
    says which (for the log, never the client)."""


def is_srs(local: str) -> bool:
    """Does ``local`` have the form of an SRS0 or SRS1 local part (quoted or
    not)?  It needs an "=" after the tag, which no account name has
    (mail/address.py), so an account called ``srs0-team`` is never taken for
    one."""
    local = unquote_local_part(local)
    return (
        len(local) > 5
        and local[:4].upper() in ("SRS0", "SRS1")
        and local[4] in _SEPARATORS
        and "=" in local[5:]
    )


class Srs:
    """Rewrites forwarded senders and checks the addresses bounces come back to."""

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        max_age_days: int = MAX_AGE_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("SRS needs at least one secret")
        self._keys = tuple(keys)
        self._max_age = max_age_days
        self._clock = clock

    # --- making addresses --------------------------------------------------------
    def forward(self, sender: Address, domain: str) -> Address | None:
        """The SRS address in ``domain`` for ``sender``; None when it cannot be
        written as a valid path (longer than RFC 5321 §4.5.3.1.3 allows).

        A quoted local part is rewritten by what it stands for: ``"someone"``
        is ``someone`` (RFC 5322 §3.4.1), and the SRS local part made from
        one that is no dot-atom (``"a b"``) is quoted whole, so it is still
        one valid local part that ``reverse`` reads back."""
        local = unquote_local_part(sender.local)
        if is_srs(local) and local[:4].upper() == "SRS1":
            # We are hop n > 2: keep the first hop and its opaque part, hash anew.
            parts = local[5:].split("=", 2)
            if len(parts) < 3 or not parts[1] or not parts[2]:
                return None
            host, opaque = parts[1], parts[2]
            if opaque[0] not in _SEPARATORS:
                return None
            new = f"SRS1={self._hash(self._keys[0], host, opaque)}={host}={opaque}"
        elif is_srs(local):
            # We are the second hop: bounces go back to the first through us.
            host, opaque = sender.domain, local[4:]
            new = f"SRS1={self._hash(self._keys[0], host, opaque)}={host}={opaque}"
        else:
            stamp = self._stamp(self._today())
            hashed = self._hash(self._keys[0], stamp, sender.domain, local)
            new = f"SRS0={hashed}={stamp}={sender.domain}={local}"
        try:
            return parse_path(f"<{format_local_part(new)}@{domain}>", utf8=not new.isascii())
        except AddressError:
            return None

    # --- checking them -------------------------------------------------------------
    def reverse(self, address: Address, *, check_age: bool = True) -> Address:
        """Where a bounce to our SRS ``address`` goes; SrsError if it is not
        one we made (bad hash), is too old (``check_age``) or is malformed.
        A quoted SRS local part (``forward`` makes one for a sender that is
        no dot-atom) is read by its content, and gives back a quoted one."""
        local = unquote_local_part(address.local)
        if not is_srs(local):
            raise SrsError("not an SRS address")
        if local[:4].upper() == "SRS1":
            parts = local[5:].split("=", 2)
            if len(parts) < 3 or not parts[1] or len(parts[2]) < 2:
                raise SrsError("malformed SRS1 address")
            hashed, host, opaque = parts
            if opaque[0] not in _SEPARATORS:
                raise SrsError("malformed SRS1 address")
            self._check_hash(hashed, host, opaque)
            target = f"{format_local_part('SRS0' + opaque)}@{host}"
        else:
            parts = local[5:].split("=", 3)
            if len(parts) < 4 or not all(parts):
                raise SrsError("malformed SRS0 address")
            hashed, stamp, host, orig_local = parts
            self._check_hash(hashed, stamp, host, orig_local)
            if check_age:
                self._check_stamp(stamp)
            target = f"{format_local_part(orig_local)}@{host}"
        try:
            reversed_ = parse_path(f"<{target}>", utf8=not target.isascii())
        except AddressError as exc:
            raise SrsError(f"SRS address hides an invalid one: {exc}") from exc
        assert reversed_ is not None  # a non-empty path
        return reversed_

    def _check_hash(self, given: str, *parts: str) -> None:
        if len(given) != HASH_LENGTH:
            raise SrsError("bad hash")  # never compared on the attacker's length
        wanted = given.lower().encode("ascii", "replace")
        for key in self._keys:
            if hmac.compare_digest(self._hash(key, *parts).lower().encode(), wanted):
                return
        raise SrsError("bad hash")

    def _check_stamp(self, stamp: str) -> None:
        if len(stamp) != 2 or any(c not in _BASE32 for c in stamp.upper()):
            raise SrsError("malformed time stamp")
        then = _BASE32.index(stamp[0].upper()) << 5 | _BASE32.index(stamp[1].upper())
        age = (self._today() - then) % _STAMP_CYCLE  # the future wraps to ~1024 days old
        if age > self._max_age:
            raise SrsError(f"expired ({age} days old)")

    def _today(self) -> int:
        return int(self._clock() // _DAY) % _STAMP_CYCLE

    @staticmethod
    def _stamp(day: int) -> str:
        return _BASE32[(day >> 5) & 31] + _BASE32[day & 31]

    @staticmethod
    def _hash(key: bytes, *parts: str) -> str:
        mac = hmac.new(key, digestmod=hashlib.sha1)
        for part in parts:
            # ASCII-only lower case, as libsrs2's tolower(): the same bytes both ways.
            mac.update(part.encode("utf-8", "surrogatepass").lower())
        return base64.b64encode(mac.digest()).decode("ascii")[:HASH_LENGTH]


def forwarding_sender(
    srs: Srs | None, sender: Address | None, domain: str, is_local_domain: Callable[[str], bool]
) -> Address | None:
    """The envelope sender for mail that an alias in ``domain`` forwards
    off-site.  The null sender stays null (a bounce must never get a return
    path, RFC 5321 §4.5.5); our own domains' senders pass SPF as they are;
    everyone else's is rewritten (SRS0, or SRS1 for an SRS address).

    A sender whose SRS address would not fit a path (RFC 5321 §4.5.3.1.3) is
    replaced by the null sender, never kept: kept, it would fail SPF at the
    next hop and turn every refusal there into backscatter to whoever the
    sender claims to be (the very thing SRS is for).  With ``<>`` the mail is
    still delivered and nothing bounces; deferring instead would only
    bounce it days later, for a sender that cannot get shorter."""
    if srs is None or sender is None or sender.is_literal or is_local_domain(sender.domain):
        return sender
    rewritten = srs.forward(sender, domain)
    if rewritten is None:
        log.warning(
            "srs: cannot rewrite from=%s within RFC 5321 limits; forwarded with from=<>",
            logfmt.path(sender),
        )
    return rewritten


# --- the secrets file ------------------------------------------------------------------
def load_secrets(data_dir: Path) -> list[bytes]:
    """The secrets in ``data_dir/srs_secrets``, made (one random secret, mode
    0600) if the file does not exist.  Blocking; call at start.  OSError
    (with the file name) if the file is unusable."""
    path = data_dir / SECRETS_FILE
    if not path.exists():
        _create(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("srs: %s was mode %o; made 0600 (it holds secrets)", path, mode)
        os.chmod(path, 0o600)
    keys = []
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_SECRET_LENGTH:
            # An OSError with the file name: the CLI prints "postoffice: <file>: <reason>".
            reason = f"line {number}: an SRS secret needs at least {MIN_SECRET_LENGTH} characters"
            raise OSError(errno.EINVAL, reason, str(path))
        keys.append(line.encode("utf-8"))
    if not keys:
        raise OSError(errno.EINVAL, "no SRS secret in the file", str(path))
    return keys


def _create(path: Path) -> None:
    """A new secrets file, published whole: written to a temporary name and
    linked into place, so a second process starting at the same moment either
    finds no file or the complete one (and link refuses to replace it)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, f"{secrets.token_hex(32)}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
