"""Who may send to whom: the relay decision and submission sender ownership.

No open relay (RFC 5321 §3.6, RFC 5068): a recipient outside the local
domains is accepted only from an authenticated submission client.  The
recipient's local part is never interpreted as a route: ``%``, ``!`` and
quoted local parts are just names that no account has, and source routes were
already dropped by the parser.

Bounces to the SRS addresses forwarded mail leaves with (policy/srs.py) are
relayed to the original sender, but only with the null reverse-path, only
for an address we made (hash) within MAX_AGE_DAYS, only up to
SRS_MAX_MESSAGE octets and only one at a time (the session enforces the last
two): anyone who has seen one forwarded copy holds a valid address, and it
must not become a channel for large or bulk mail to the original sender.

Postmaster is per domain (RFC 5321 §4.5.1): ``postmaster@D`` is whatever
user, alias or catch-all D has for it, never another domain's postmaster, so
one tenant's postmaster neither reads another's reports nor may send as it.
A domain that has none yet answers 451 4.3.0: RFC 5321 requires the mailbox,
so the refusal is temporary (the sender retries, nothing is lost) and logged
until the administrator adds it (``postoffice check`` warns too).  The bare
``<postmaster>`` is the server's: the postmaster of the host name when that
is a local domain, else of the first configured domain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from postoffice import logfmt
from postoffice.config.settings import Settings
from postoffice.mail.address import Address
from postoffice.policy.srs import Srs, SrsError, is_srs
from postoffice.protocol.smtp_reply import Reply
from postoffice.storage.accounts import AccountStore


class RelayContext(Protocol):
    """What the relay decision reads (``services.Services`` has it all)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def accounts(self) -> AccountStore: ...

    @property
    def srs(self) -> Srs | None: ...

    def is_local_domain(self, domain: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class RecipientVerdict:
    """Either a refusal (``reply``) or where the mail for this recipient goes."""

    reply: Reply | None = None
    mailboxes: tuple[Address, ...] = ()
    remote: tuple[Address, ...] = ()
    # An alias of this local domain sends the mail off-site: its envelope
    # sender is to be rewritten into this domain (policy/srs.py).
    forwarded_by: str = ""
    # A bounce to one of our SRS addresses, relayed to the original sender:
    # at most SRS_MAX_MESSAGE octets, and alone in its transaction.
    srs_bounce: bool = False


log = logging.getLogger("postoffice.smtp")

POSTMASTER = "postmaster"
RELAY_DENIED = Reply(554, "Relay access denied", "5.7.1")
UNKNOWN_USER = Reply(550, "Recipient address rejected: User unknown", "5.1.1")
BAD_SRS = Reply(550, "Recipient address rejected: invalid or expired SRS address", "5.1.1")
SRS_NOT_BOUNCE = Reply(550, "SRS addresses accept only bounces (MAIL FROM:<>)", "5.7.1")
NO_POSTMASTER = Reply(451, "Postmaster mailbox not configured yet, try again later", "4.3.0")
# A DSN quotes headers, not whole messages (ours: 4 KiB of summary or 64 KiB
# of header): a "bounce" bigger than this through an SRS address is content.
SRS_MAX_MESSAGE = 64 * 1024
SRS_TOO_BIG = Reply(
    552, f"Message too big for a bounce to an SRS address ({SRS_MAX_MESSAGE} octets)", "5.3.4"
)
# RFC 5321 §4.5.3.1.10: 452 for a recipient this transaction cannot take now;
# the client sends it again in a transaction of its own.
SRS_ALONE = Reply(452, "Too many recipients: a bounce to an SRS address goes alone", "4.5.3")


def judge_recipient(
    services: RelayContext, rcpt: Address, *, may_relay: bool, null_sender: bool = False
) -> RecipientVerdict:
    """Where mail for ``rcpt`` goes, or why not.  ``null_sender``: the
    transaction is a bounce (MAIL FROM:<>), the only kind SRS addresses take."""
    if rcpt.is_literal:
        # An address literal is never one of our domains; relaying to one is
        # refused even for authenticated users (it bypasses MX routing).
        return RecipientVerdict(
            reply=RELAY_DENIED
            if not may_relay
            else Reply(550, "Address literals are not accepted", "5.1.2")
        )
    if services.srs is not None and is_srs(rcpt.local) and services.is_local_domain(rcpt.domain):
        return _judge_srs(services, rcpt, null_sender=null_sender)
    resolution = services.accounts.resolve(rcpt)
    if resolution is None and rcpt.domain in services.settings.domains:
        resolution = services.accounts.resolve(Address(rcpt.local, rcpt.domain))
    if resolution is None:
        if may_relay:
            return RecipientVerdict(remote=(rcpt,))
        return RecipientVerdict(reply=RELAY_DENIED)
    if not resolution.exists:
        if rcpt.local.lower() == POSTMASTER:
            log.warning(
                "no postmaster for %s (RFC 5321 4.5.1): mail to it is deferred (451);"
                " postoffice alias add postmaster@%s ADDRESS",
                rcpt.domain,
                rcpt.domain,
            )
            return RecipientVerdict(reply=NO_POSTMASTER)
        return RecipientVerdict(reply=UNKNOWN_USER)
    return RecipientVerdict(
        mailboxes=resolution.mailboxes,
        remote=resolution.forwards,
        forwarded_by=rcpt.domain if resolution.forwards else "",
    )


def _judge_srs(services: RelayContext, rcpt: Address, *, null_sender: bool) -> RecipientVerdict:
    """A bounce to the SRS address of mail we forwarded: back to its sender."""
    assert services.srs is not None
    try:
        original = services.srs.reverse(rcpt)
    except SrsError as exc:
        log.info("srs: refused to=%s reason=%s", logfmt.path(rcpt), logfmt.field(exc))
        return RecipientVerdict(reply=BAD_SRS)
    if not null_sender:
        # DSNs (RFC 5321 §4.5.5) and auto-replies (RFC 3834 §3.3) come from <>;
        # anything else would make a valid SRS address a relay for any content.
        return RecipientVerdict(reply=SRS_NOT_BOUNCE)
    # The original sender may be remote (the usual case) or, for SRS1, the
    # first forwarder's SRS0 address; relaying there is what the address is for.
    verdict = judge_recipient(services, original, may_relay=True, null_sender=True)
    return RecipientVerdict(verdict.reply, verdict.mailboxes, verdict.remote, srs_bounce=True)


def server_postmaster(services: RelayContext) -> Address:
    """What the bare ``<postmaster>`` (RFC 5321 §4.1.1.3) means here: the
    postmaster of the host name if it is a local domain, else of the first
    configured domain (else of the first added one)."""
    settings = services.settings
    if services.is_local_domain(settings.hostname):
        return Address(POSTMASTER, settings.hostname)
    domains = settings.domains or tuple(services.accounts.list_domains())
    return Address(POSTMASTER, domains[0] if domains else settings.hostname)


def sender_allowed(accounts: AccountStore, user: Address, sender: Address | None) -> bool:
    """May ``user`` send as ``sender``?  Its own address, a plus-address of it,
    or an alias whose expansion includes its mailbox (RFC 6409 §6.1)."""
    if sender is None or sender.is_literal:
        return False
    if sender.domain == user.domain and sender.local.lower() == user.local:
        return True
    resolution = accounts.resolve(sender)
    return resolution is not None and user in resolution.mailboxes
