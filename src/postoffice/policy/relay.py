"""Who may send to whom: the relay decision and submission sender ownership.

No open relay (RFC 5321 §3.6, RFC 5068): a recipient outside the local
domains is accepted only from an authenticated submission client.  The
recipient's local part is never interpreted as a route: ``%``, ``!`` and
quoted local parts are just names that no account has, and source routes were
already dropped by the parser.
"""

from __future__ import annotations

from dataclasses import dataclass

from postoffice.mail.address import Address
from postoffice.protocol.smtp_reply import Reply
from postoffice.services import Services
from postoffice.storage.accounts import AccountStore


@dataclass(frozen=True, slots=True)
class RecipientVerdict:
    """Either a refusal (``reply``) or where the mail for this recipient goes."""

    reply: Reply | None = None
    mailboxes: tuple[Address, ...] = ()
    remote: tuple[Address, ...] = ()


RELAY_DENIED = Reply(554, "Relay access denied", "5.7.1")
UNKNOWN_USER = Reply(550, "Recipient address rejected: User unknown", "5.1.1")


def judge_recipient(services: Services, rcpt: Address, *, may_relay: bool) -> RecipientVerdict:
    if rcpt.is_literal:
        # An address literal is never one of our domains; relaying to one is
        # refused even for authenticated users (it bypasses MX routing).
        return RecipientVerdict(
            reply=RELAY_DENIED
            if not may_relay
            else Reply(550, "Address literals are not accepted", "5.1.2")
        )
    resolution = services.accounts.resolve(rcpt)
    if resolution is None and rcpt.domain in services.settings.domains:
        resolution = services.accounts.resolve(Address(rcpt.local, rcpt.domain))
    if resolution is None:
        if may_relay:
            return RecipientVerdict(remote=(rcpt,))
        return RecipientVerdict(reply=RELAY_DENIED)
    if not resolution.exists:
        return RecipientVerdict(reply=UNKNOWN_USER)
    return RecipientVerdict(mailboxes=resolution.mailboxes, remote=resolution.forwards)


def sender_allowed(accounts: AccountStore, user: Address, sender: Address | None) -> bool:
    """May ``user`` send as ``sender``?  Its own address, a plus-address of it,
    or an alias whose expansion includes its mailbox (RFC 6409 §6.1)."""
    if sender is None or sender.is_literal:
        return False
    if sender.domain == user.domain and sender.local.lower() == user.local:
        return True
    resolution = accounts.resolve(sender)
    return resolution is not None and user in resolution.mailboxes
