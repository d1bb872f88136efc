"""What a queued message is: its envelope, its recipients and their states.

Pure data and its JSON forms: the envelope goes once into the first line of
``<id>.msg`` (``StoredEnvelope.header_line``), the recipients' states into
``<id>.json`` (``QueueEntry.state_json``) each time they change.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from postoffice.delivery.content import MessageTraits
from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import (
    NO_MESSAGE_DSN,
    NO_RECIPIENT_DSN,
    MessageDsn,
    RecipientDsn,
)
from postoffice.storage.errors import DeliveryError

MAGIC = b"postoffice-queue 1 "
QUEUE_ID = re.compile(r"[0-9a-z]{6,40}(?:-[a-z0-9]{1,8})?")


class QueueError(DeliveryError):
    """The queue could not store or read a message; safe to show.  A
    DeliveryError: its ``fault`` decides the SMTP session's answer."""


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds, hex) and unguessable (random tail)."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(4)}"


class RecipientState(enum.StrEnum):
    QUEUED = "queued"  # not tried yet
    DEFERRED = "deferred"  # tried, failed temporarily; retried at next_try
    DELIVERED = "delivered"  # accepted by the next hop or a local mailbox
    FAILED = "failed"  # failed permanently; a DSN is owed to the sender
    BOUNCED = "bounced"  # failed, and the DSN is queued (or none is due: null sender)


PENDING = frozenset({RecipientState.QUEUED, RecipientState.DEFERRED})


@dataclass
class Recipient:
    address: Address
    state: RecipientState = RecipientState.QUEUED
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""  # the last reply (or connection error) text
    status: str = ""  # RFC 3463 status for a DSN, e.g. "5.1.1"
    remote: str = ""  # the host that gave last_error, if any
    smtp_reply: bool = False  # last_error is that host's SMTP reply
    last_attempt: float = 0.0
    dsn: RecipientDsn = NO_RECIPIENT_DSN  # NOTIFY and ORCPT (RFC 3461)
    # A success notice owed ("delivered", "relayed": RFC 3464 §2.3.3), "sent"
    # once it is queued; "" when none is due.
    notice: str = ""

    @property
    def pending(self) -> bool:
        return self.state in PENDING

    def to_json(self) -> dict[str, Any]:
        return {
            "to": [self.address.local, self.address.domain],
            "state": self.state.value,
            "attempts": self.attempts,
            "next_try": self.next_try,
            "error": self.last_error,
            "status": self.status,
            "remote": self.remote,
            "smtp": self.smtp_reply,
            "last": self.last_attempt,
            **_recipient_dsn_json(self.dsn),
            **({"notice": self.notice} if self.notice else {}),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Recipient:
        local, domain = raw["to"]
        return cls(
            address=Address(str(local), str(domain)),
            state=RecipientState(raw["state"]),
            attempts=int(raw.get("attempts", 0)),
            next_try=float(raw.get("next_try", 0.0)),
            last_error=str(raw.get("error", "")),
            status=str(raw.get("status", "")),
            remote=str(raw.get("remote", "")),
            smtp_reply=bool(raw.get("smtp", False)),
            last_attempt=float(raw.get("last", 0.0)),
            dsn=_recipient_dsn(raw),
            notice=str(raw.get("notice", "")),
        )


# The DSN parameters are written only when given, so a queue file without
# them (older versions wrote none) reads as "not given": the defaults.
def _recipient_dsn_json(dsn: RecipientDsn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dsn.notify is not None:
        out["notify"] = sorted(dsn.notify)
    if dsn.orcpt:
        out["orcpt"] = dsn.orcpt
    return out


def _recipient_dsn(raw: dict[str, Any]) -> RecipientDsn:
    notify = raw.get("notify")
    return RecipientDsn(
        None if notify is None else frozenset(str(w) for w in notify), str(raw.get("orcpt", ""))
    )


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """What a queued message arrived with; written once, never changed.
    (The SMTP session's ``IncomingEnvelope`` is the one being received.)"""

    queue_id: str
    sender: Address | None  # None: the null reverse-path (a bounce)
    recipients: tuple[Address, ...]
    created: float
    dsn: MessageDsn = NO_MESSAGE_DSN  # RET and ENVID (RFC 3461)
    rcpt_dsn: tuple[RecipientDsn, ...] = ()  # per recipient, in order; () when none given

    def recipient_dsn(self, index: int) -> RecipientDsn:
        return self.rcpt_dsn[index] if index < len(self.rcpt_dsn) else RecipientDsn()

    def header_line(self) -> bytes:
        raw: dict[str, Any] = {
            "id": self.queue_id,
            "from": None if self.sender is None else [self.sender.local, self.sender.domain],
            "to": [[r.local, r.domain] for r in self.recipients],
            "created": self.created,
        }
        if self.dsn.ret:
            raw["ret"] = self.dsn.ret
        if self.dsn.envid:
            raw["envid"] = self.dsn.envid
        if self.dsn.requiretls:
            raw["requiretls"] = True
        if any(d.given for d in self.rcpt_dsn):
            raw["rcpt_dsn"] = [_recipient_dsn_json(d) for d in self.rcpt_dsn]
        return MAGIC + json.dumps(raw, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> StoredEnvelope:
        if not line.startswith(MAGIC) or not line.endswith(b"\n"):
            raise QueueError("not a queue file")
        raw = json.loads(line[len(MAGIC) :])
        sender = None if raw["from"] is None else Address(*map(str, raw["from"]))
        return cls(
            queue_id=str(raw["id"]),
            sender=sender,
            recipients=tuple(Address(str(l_), str(d)) for l_, d in raw["to"]),
            created=float(raw["created"]),
            dsn=MessageDsn(
                str(raw.get("ret", "")), str(raw.get("envid", "")), raw.get("requiretls") is True
            ),
            rcpt_dsn=tuple(_recipient_dsn(d) for d in raw.get("rcpt_dsn", ())),
        )


@dataclass
class QueueEntry:
    envelope: StoredEnvelope
    recipients: list[Recipient]
    body_offset: int  # where the message starts in the .msg file
    warned: bool = False  # a "delayed" DSN has been sent
    dsn_count: int = 0  # failure DSNs sent so far (names the next one's queue id)
    traits: MessageTraits | None = None  # cached; recomputed from the file after a restart
    state_on_disk: bool = False  # a .json may exist (loaded with one, or one was written)

    @classmethod
    def new(
        cls, envelope: StoredEnvelope, body_offset: int, traits: MessageTraits | None = None
    ) -> QueueEntry:
        """Every recipient queued and due at arrival (no state file yet)."""
        recipients = [
            Recipient(a, next_try=envelope.created, dsn=envelope.recipient_dsn(i))
            for i, a in enumerate(envelope.recipients)
        ]
        return cls(envelope, recipients, body_offset, traits=traits)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    @property
    def done(self) -> bool:
        return not any(r.pending or r.state is RecipientState.FAILED for r in self.recipients)

    def next_due(self) -> float | None:
        times = [r.next_try for r in self.recipients if r.pending]
        return min(times) if times else None

    def state_json(self) -> bytes:
        raw = {
            "v": 1,
            "warned": self.warned,
            "dsn": self.dsn_count,
            "recipients": [r.to_json() for r in self.recipients],
        }
        return json.dumps(raw, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"

    def apply_state(self, data: bytes) -> None:
        raw = json.loads(data)
        self.warned = bool(raw.get("warned", False))
        self.dsn_count = int(raw.get("dsn", 0))
        self.recipients = [Recipient.from_json(r) for r in raw["recipients"]]
