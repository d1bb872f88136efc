"""Which passwords ``postoffice user add|passwd`` refuses (``--allow-weak`` overrides).

Following NIST SP 800-63B §5.1.1.2: a minimum length and no composition
rules; a blank password and one equal to the user's own name are refused
too, since they are the first guesses of every password sprayer.  Hashing
(argon2id) and login throttling live in policy/auth.py.
"""

from __future__ import annotations

from postoffice.mail.address import Address

MIN_LENGTH = 8  # characters (NIST SP 800-63B: at least 8 for a chosen password)


def weakness(password: str, owner: Address) -> str | None:
    """Why ``password`` is too weak for ``owner``, or None."""
    if not password.strip():
        return "it is blank"
    if len(password) < MIN_LENGTH:
        return f"it is shorter than {MIN_LENGTH} characters"
    if password.strip().lower() in (owner.local.lower(), str(owner).lower()):
        return "it is the user's own name"
    return None
