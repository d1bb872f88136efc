"""What a protocol session needs from the rest of the server, in one object.

Built once by the composition root (``app.py``) and handed to each session;
sessions never build services themselves and no module keeps global state.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from postoffice.config.settings import Settings
from postoffice.dns.resolver import Resolver
from postoffice.filters.chain import FilterChain
from postoffice.filters.learn import SpamLearner
from postoffice.mail.address import Address
from postoffice.policy.auth import Authenticator
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.mailauth import InboundChecks
from postoffice.policy.memory_budget import MAX_HELD_BYTES, MemoryBudget
from postoffice.policy.srs import Srs
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn
from postoffice.storage.accounts import AccountStore
from postoffice.storage.folder_watch import FolderWatcher
from postoffice.storage.free_space import FreeSpaceGuard
from postoffice.storage.maildir import DeliveryWriter, MaildirStore
from postoffice.storage.pop3_mailbox import MaildropLocks
from postoffice.storage.quota import QuotaTracker
from postoffice.storage.sink import HeadedSink


class OutboundQueue(Protocol):
    """Where a session puts mail for remote recipients: the outbound queue
    (delivery/outbound.py's ``Outbound``, or ``QueueHandoff`` in an extra
    smtp process).  A protocol because the queue lives above the sessions'
    layer (delivery/ imports net/)."""

    def writer(
        self,
        sender: Address | None,
        recipients: Sequence[Address],
        *,
        queue_id: str | None = None,
        dsn: MessageDsn | None = None,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> HeadedSink:
        """``queue_id``: the session's, kept (one id in every log record);
        ``dsn``, ``rcpt_dsn``: the DSN parameters (RFC 3461) the queue keeps."""
        ...


@dataclass
class Services:
    settings: Settings
    accounts: AccountStore
    maildirs: MaildirStore
    authenticator: Authenticator
    tls: ssl.SSLContext
    executor: ThreadPoolExecutor  # blocking file work (passwords: the authenticator's own pool)
    # The outbound queue (delivery/), set by the composition root once it
    # exists; None: no remote recipients are taken.
    outbound: OutboundQueue | None = None
    # The process's one resolver (dns/), set by the composition root.
    resolver: Resolver | None = None
    # Inbound message checks (SPF/DKIM/DMARC), set by the composition root.
    inbound_checks: InboundChecks | None = None
    # DKIM signing of submitted mail bound for the outbound queue; None: no signing.
    dkim_signer: DkimSigner | None = None
    # The [filters] chain (filters/build.py); None: no filters, the fast path.
    filters: FilterChain | None = None
    # [filters] rspamd_controller: IMAP moves into/out of Junk train rspamd.
    spam_learner: SpamLearner | None = None
    # Sender Rewriting Scheme for mail aliases forward off-site (policy/srs.py).
    srs: Srs | None = None
    # The free-space reserve ([limits] min_free_space): MAIL FROM asks ``low()``.
    space: FreeSpaceGuard | None = None
    # Users' Sieve ereject/reject at SMTP time for a message with one local
    # recipient, held in memory (delivery/sieve.py SieveDelivery.ereject): the
    # reason, or None; the decision stays on the writer for its commit.
    sieve_ereject: Callable[[DeliveryWriter], Awaitable[str | None]] | None = None
    # Mailbox quotas ([limits] mailbox_quota, `user quota`): RCPT and DATA ask it.
    quota: QuotaTracker | None = None
    # [cluster]: POP3 maildrop locks the other nodes honour (cluster/pop3_lock.py);
    # None: the Maildir's flock alone.
    pop3_locks: MaildropLocks | None = None
    # What else may hold a thread or a database connection ([cluster]: the
    # shared login throttle's feed, the DKIM key listener), closed at shutdown.
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Memory for messages held whole for the inbound checks, shared by all
    # SMTP sessions of the process (policy/memory_budget.py).
    held_messages: MemoryBudget = field(default_factory=lambda: MemoryBudget(MAX_HELD_BYTES))
    # The process's one watcher of selected IMAP folders (IDLE's wake-up).
    folder_watcher: FolderWatcher = field(default_factory=FolderWatcher)
    # ACME http-01 (RFC 8555 §8.3): token -> key authorization while an order
    # is validated (net/acme.py writes from its thread; net/web.py serves them).
    acme_http01: dict[str, str] = field(default_factory=dict)
    # ACME tls-alpn-01 (RFC 8737): name -> the challenge's TLS context, picked
    # by SNI on the TLS listeners (net/tls.answer_tls_alpn) while validated.
    acme_tls_alpn: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.settings.domains or self.accounts.is_local_domain(domain)
