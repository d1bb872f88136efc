"""What a courier returns: one outcome per recipient, and how it reads the message.

Couriers (``remote.RemoteCourier`` over SMTP, ``local.LocalCourier`` into
Maildirs) take a sender, recipients and a ``MessageSource`` and say, per
recipient, delivered / deferred / failed with the text and RFC 3463 status
that the queue stores, logs and puts into DSNs.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from postoffice.delivery.content import MessageTraits
from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn
from postoffice.protocol.smtp_reply import Reply


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    address: Address
    outcome: Outcome
    text: str  # the deciding reply or error, one line
    status: str  # RFC 3463 status code, e.g. "2.0.0", "4.4.1", "5.1.1"
    remote: str = ""  # which host said it, e.g. "mx1.example[192.0.2.1]:25"
    smtp_reply: bool = False  # ``text`` is a reply from the remote host (DSN Diagnostic-Code)
    forwards: tuple[Address, ...] = ()  # local aliases: remote targets to queue in its place
    # The next hop offered DSN and was given NOTIFY/ORCPT: success notices are
    # its job now (RFC 3461 §5.2.2); without it we send a "relayed" one.
    peer_dsn: bool = False


class MessageSource(Protocol):
    """The queued message, readable any number of times (one per MX tried)."""

    @property
    def traits(self) -> MessageTraits: ...

    @property
    def dsn(self) -> MessageDsn:
        """RET and ENVID, for a next hop that offers DSN."""
        ...

    def recipient_dsn(self, address: Address) -> RecipientDsn:
        """NOTIFY and ORCPT of one recipient."""
        ...

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The message (LF form) in chunks, from the start."""
        ...


def status_of(reply: Reply) -> str:
    """The RFC 3463 status of a reply: the peer's own, else the class default."""
    return reply.enhanced or f"{str(reply.code)[0]}.0.0"


def outcome_of(reply: Reply) -> Outcome:
    if reply.is_positive:
        return Outcome.DELIVERED
    return Outcome.FAILED if reply.is_permanent else Outcome.DEFERRED
