"""App passwords: one per mail client, made by the server, revoked one by one.

A phone that keeps the account's password is one stolen phone away from
the account; an app password lets the owner cut that one client off
(/account) without changing the password everywhere else.

They are made here, never chosen: 16 characters from a 31-letter alphabet
(79 random bits), shown once as four groups (``abcd-efgh-ijkm-npqr``).
With that much randomness nobody guesses one online (and logins are
throttled), and a leaked table cannot be searched for it either, so each
is kept as a plain SHA-256 of its normalised form, as API tokens are: a
check costs microseconds, not an argon2 run.  Typing them in with or
without the dashes, in either case, is the same password.
"""

from __future__ import annotations

import hashlib
import secrets

# Lower-case letters and digits without the look-alikes (0/o, 1/l/i):
# 31 symbols, so 16 of them hold 79 random bits.
ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
LENGTH = 16


def generate() -> str:
    chars = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    return "-".join(chars[i : i + 4] for i in range(0, LENGTH, 4))


def normalise(password: str) -> str | None:
    """The password's 16 characters, or None when it cannot be an app password."""
    text = password.replace("-", "").replace(" ", "").lower()
    if len(text) != LENGTH or any(c not in ALPHABET for c in text):
        return None
    return text


def digest(password: str) -> str | None:
    """What the store keeps (and a login is compared with); None: not one."""
    text = normalise(password)
    return hashlib.sha256(text.encode("ascii")).hexdigest() if text else None
