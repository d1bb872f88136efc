"""What an SMTP session knows of the message it is receiving: the envelope
and the transaction (writers, header gate, spool).

Why apart from smtp_session.py: the filtered path (smtp_filtering.py)
works on the same transaction and builds envelopes too; both import these
types from here, so neither imports the other's module.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from postoffice.filters.spool import SpoolWriter
from postoffice.mail.address import Address
from postoffice.mail.headers import HeaderGate
from postoffice.protocol.dsn_params import NO_MESSAGE_DSN, MessageDsn, RecipientDsn
from postoffice.protocol.smtp_reply import Reply
from postoffice.storage.maildir import DeliveryWriter
from postoffice.storage.sink import MessageSink


@dataclass
class IncomingEnvelope:
    """What MAIL FROM and RCPT TO have said so far, and where each recipient
    goes.  (What the queue keeps of it is delivery/queue's ``StoredEnvelope``.)"""

    sender: Address | None = None
    smtputf8: bool = False
    mailboxes: dict[Address, None] = field(default_factory=dict)  # ordered set
    remote: dict[Address, None] = field(default_factory=dict)  # via the outbound queue
    recipients: list[Address] = field(default_factory=list)  # as given, for the log
    # Each mailbox's RCPT TO (alice+lists@, an alias), the first naming it: Sieve's envelope.
    originals: dict[Address, Address] = field(default_factory=dict)
    forwarded_by: str = ""  # the domain of the first alias forwarding off-site (SRS)
    srs_bounce: bool = False  # the recipient is one of our SRS addresses (alone, capped)
    declared_size: int = 0  # MAIL FROM's SIZE= (RFC 1870), 0 if none
    dsn: MessageDsn = NO_MESSAGE_DSN  # RET, ENVID (RFC 3461)
    rcpt_dsn: dict[Address, RecipientDsn] = field(default_factory=dict)  # NOTIFY, ORCPT


@dataclass
class Transaction:
    """The message being received: writers and the header gate."""

    envelope: IncomingEnvelope
    queue_id: str
    local: DeliveryWriter | None
    outbound: MessageSink[str] | None  # into the queue; commit gives the queue id
    gate: HeaderGate
    started: float
    local_prefix_done: bool = False
    extra_headers: bytes = b""  # e.g. Authentication-Results, after Received:
    failure: Reply | None = None  # storing failed mid-DATA: the answer after the final dot
    held_bytes: int = 0  # this message's share of Services.held_messages
    srs_bytes: int = 0  # content received so far for an SRS bounce (SRS_MAX_MESSAGE)
    # With [filters]: the content goes here during DATA (net/smtp_filtering.py).
    spool: SpoolWriter | None = None
    quarantine_reason: str = ""  # DMARC p=quarantine, for the filtered path
    discarded: bool = False  # a filter discarded it: 250, nothing stored
    delivered_folder: str = "INBOX"


def new_queue_id() -> str:
    """Short, unique, roughly time-ordered ids for logs and Received headers.
    Not secret: ``random`` (seeded from os.urandom) avoids a syscall per id."""
    return f"{time.time_ns() // 1000:x}{random.getrandbits(24):06x}"
