"""What an SMTP session did, for the one log record it ends with.

Postfix ends every session with ``disconnect from host[addr] ehlo=1 mail=1
rcpt=0/1 data=0/1 commands=2/4``: per command, how many succeeded of how
many were given (a single number when all did), then the totals.  Admins
grep for it to see what a client tried, also when nothing was accepted, so
``SmtpSession`` writes the same counts in its ``smtp session`` record.  The
table is bounded: one counter per SMTP verb (unknown verbs share one).
"""

from __future__ import annotations

# Postfix's order; "unknown" is every line that is no command of ours.
ORDER = (
    "helo",
    "ehlo",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "rset",
    "noop",
    "vrfy",
    "help",
    "quit",
    "unknown",
)
_KNOWN = frozenset(ORDER)


class CommandTally:
    """Commands given and commands that succeeded, per verb."""

    def __init__(self) -> None:
        self._given: dict[str, int] = {}
        self._ok: dict[str, int] = {}

    def given(self, verb: str) -> None:
        verb = verb if verb in _KNOWN else "unknown"
        self._given[verb] = self._given.get(verb, 0) + 1

    def succeeded(self, verb: str) -> None:
        verb = verb if verb in _KNOWN else "unknown"
        self._ok[verb] = self._ok.get(verb, 0) + 1

    def summary(self) -> str:
        """``ehlo=1 mail=1 rcpt=0/1 commands=2/3`` (``commands=0`` for none)."""
        fields = []
        given = ok = 0
        for verb in ORDER:
            n = self._given.get(verb, 0)
            if not n:
                continue
            k = min(self._ok.get(verb, 0), n)
            given += n
            ok += k
            fields.append(f"{verb}={k}" if k == n else f"{verb}={k}/{n}")
        fields.append(f"commands={ok}" if ok == given else f"commands={ok}/{given}")
        return " ".join(fields)
