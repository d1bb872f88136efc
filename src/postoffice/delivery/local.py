"""The local courier: queued mail for our own domains goes into Maildirs.

The queue needs it for bounces to local senders and for aliases that mix
local and remote targets.  Each recipient is resolved through the account
store; its mailboxes share one Maildir delivery, and remote alias targets
come back as ``forwards`` for the queue to send on.  The delivered copy gets
a Return-Path header, as the final delivery MTA must add (RFC 5321 §4.4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

from postoffice.delivery.courier import MessageSource, Outcome, RecipientResult
from postoffice.mail.address import Address, AddressError
from postoffice.protocol.smtp_client import format_path
from postoffice.storage.accounts import AccountStore
from postoffice.storage.errors import DeliveryError, StorageFault
from postoffice.storage.maildir import MaildirStore
from postoffice.storage.sink import MessageSink


class LocalCourier:
    def __init__(
        self,
        accounts: AccountStore,
        maildirs: MaildirStore,
        is_local_domain: Callable[[str], bool],
    ) -> None:
        self._accounts = accounts
        self._maildirs = maildirs
        self.is_local_domain = is_local_domain

    async def deliver(
        self, sender: Address | None, recipients: Sequence[Address], message: MessageSource
    ) -> list[RecipientResult]:
        results: dict[Address, RecipientResult] = {}
        mailboxes: dict[Address, None] = {}
        originals: dict[Address, Address] = {}  # each mailbox's recipient (an alias): Sieve's
        to_store: list[Address] = []
        for rcpt in recipients:
            resolution = self._accounts.resolve(rcpt)
            if resolution is None:
                # The domain stopped being local since the message was queued:
                # the next round routes it by MX.
                results[rcpt] = RecipientResult(
                    rcpt, Outcome.DEFERRED, "domain is no longer local", "4.3.0"
                )
            elif not resolution.exists:
                results[rcpt] = RecipientResult(
                    rcpt, Outcome.FAILED, "no such mailbox here", "5.1.1"
                )
            else:
                mailboxes.update(dict.fromkeys(resolution.mailboxes))
                for mailbox in resolution.mailboxes:
                    originals.setdefault(mailbox, rcpt)
                to_store.append(rcpt)
                results[rcpt] = RecipientResult(
                    rcpt,
                    Outcome.DELIVERED,
                    "delivered to mailbox" if resolution.mailboxes else "forwarded",
                    "2.0.0",
                    forwards=resolution.forwards,
                )
        if mailboxes:
            failure = await self._store(sender, list(mailboxes), originals, message)
            if failure is not None:
                for rcpt in to_store:
                    results[rcpt] = RecipientResult(rcpt, Outcome.DEFERRED, *failure)
        return [results[r] for r in recipients]

    async def _store(
        self,
        sender: Address | None,
        mailboxes: list[Address],
        originals: dict[Address, Address],
        message: MessageSource,
    ) -> tuple[str, str] | None:
        """Store one copy in every mailbox; (text, status) if that failed."""
        try:
            writer: MessageSink[list[Path]] = self._maildirs.writer(mailboxes, originals)
        except (AddressError, ValueError) as exc:
            return f"bad mailbox: {exc}", "4.3.0"
        try:
            await writer.write(f"Return-Path: {format_path(sender)}\n".encode())
            async with contextlib.aclosing(message.chunks()) as chunks:
                async for chunk in chunks:
                    await writer.write(chunk)
            await writer.commit()
        except DeliveryError as exc:
            await writer.discard()
            return str(exc), "4.3.1" if exc.fault is StorageFault.NO_SPACE else "4.3.0"
        except OSError as exc:
            await writer.discard()
            return f"cannot read queued message: {exc}", "4.3.0"
        return None
