"""Typed filter verdicts and message modifications (frozen, comparable).

Why its own module: milters (their wire actions), Python hooks (their
return values) and the SMTP session (which acts on them) must agree on one
closed set of answers; everything a filter may say is a class here, so the
session's ``match`` over them is checked by mypy and nothing is stringly
typed.

A stage's answer is a ``FilterResult``: one ``Verdict`` plus, at the message
stage only, any ``Modification``\\ s.  Modifications returned at earlier
stages are ignored (and logged) because the envelope and content they
would change do not exist yet; this is also the milter protocol's rule
(actions only at end of message).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Accept:
    """No objection: go on.  (A milter's "continue" and "accept" both map here;
    the milter adapter itself skips later callbacks after "accept".)"""


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse permanently: the SMTP reply to the command at this stage (the
    RCPT at the rcpt stage: that recipient only; the data at the message
    stage).  ``code`` is 5xx; ``enhanced`` an RFC 3463 code ("5.7.1") or
    None for the default of that stage."""

    code: int = 550
    text: str = "rejected by filter"
    enhanced: str | None = "5.7.1"

    def __post_init__(self) -> None:
        if not 500 <= self.code <= 599:
            raise ValueError(f"Reject code must be 5xx, not {self.code}")


@dataclass(frozen=True, slots=True)
class Tempfail:
    """Refuse for now (4xx): the client retries later."""

    code: int = 451
    text: str = "try again later"
    enhanced: str | None = "4.7.1"

    def __post_init__(self) -> None:
        if not 400 <= self.code <= 499:
            raise ValueError(f"Tempfail code must be 4xx, not {self.code}")


@dataclass(frozen=True, slots=True)
class Discard:
    """Say 250 but deliver nothing (logged).  At the rcpt stage: the whole
    message is discarded, as with milters."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Accept, but file local copies in the recipient's Junk folder (and
    record the reason in a header); remote copies are held in the queue as
    for other quarantined mail."""

    reason: str = "quarantined by filter"


Verdict = Accept | Reject | Tempfail | Discard | Quarantine


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Add a header field: ``index`` None appends it after the last field;
    an int inserts it before the field at that 0-based position (0: on
    top; past the end: appended) - milter's addheader / insheader."""

    name: str
    value: str
    index: int | None = None


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the value of the ``occurrence``-th (1-based) field named
    ``name`` (case-insensitive); ``value`` "" deletes that field.  No such
    occurrence: with a value, the field is appended (milter chgheader)."""

    name: str
    occurrence: int
    value: str


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace the whole body: ``source`` is bytes (small bodies) or a file
    the filter wrote (read, then left to the filter to remove).  CRLF or LF
    line ends (stored with LF, like every message)."""

    source: bytes | Path


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """Add an envelope recipient (resolved local/remote as RCPT would be);
    ``args`` are ESMTP RCPT parameters, e.g. "NOTIFY=NEVER"."""

    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    """Remove an envelope recipient (compared case-insensitively)."""

    address: str


@dataclass(frozen=True, slots=True)
class ChangeSender:
    """Replace the envelope sender ("" the null sender); ``args`` ESMTP MAIL
    parameters."""

    address: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class Redirect:
    """Replace all envelope recipients with ``addresses``."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeliverToFolder:
    """File local copies in this folder of each local recipient's mailbox
    (created if missing) instead of INBOX; remote copies are unaffected."""

    folder: str


Modification = (
    AddHeader
    | ChangeHeader
    | ReplaceBody
    | AddRecipient
    | DeleteRecipient
    | ChangeSender
    | Redirect
    | DeliverToFolder
)

ACCEPT = Accept()


@dataclass(frozen=True, slots=True)
class FilterResult:
    """One filter's answer to one stage."""

    verdict: Verdict = ACCEPT
    modifications: tuple[Modification, ...] = ()


ACCEPTED = FilterResult()

DEFAULT_ACTIONS = ("tempfail", "accept", "reject")


def default_verdict(action: str, who: str) -> Verdict:
    """The verdict a failed or timed-out filter gives (its ``default_action``)."""
    if action == "accept":
        return ACCEPT
    if action == "reject":
        return Reject(550, f"message refused by filter {who}", "5.7.1")
    return Tempfail(451, f"filter {who} unavailable, try again later", "4.7.1")
