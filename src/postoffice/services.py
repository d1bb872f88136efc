"""What a protocol session needs from the rest of the server, in one object.

Built once by the composition root (``app.py``) and handed to each session;
sessions never build services themselves and no module keeps global state.
"""

from __future__ import annotations

import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from postoffice.config.settings import Settings
from postoffice.policy.auth import Authenticator
from postoffice.policy.srs import Srs
from postoffice.storage.accounts import AccountStore
from postoffice.storage.free_space import FreeSpaceGuard
from postoffice.storage.maildir import MaildirStore
from postoffice.storage.quota import QuotaTracker


@dataclass
class Services:
    settings: Settings
    accounts: AccountStore
    maildirs: MaildirStore
    authenticator: Authenticator
    tls: ssl.SSLContext
    executor: ThreadPoolExecutor  # blocking file work (passwords: the authenticator's own pool)
    # The outbound queue (delivery/), set by the composition root once it exists.
    outbound: Any = None
    # Inbound message checks (SPF/DKIM/DMARC), set by the composition root when
    # available: ``applies(client_ip) -> bool`` and ``async judge(...) -> CheckOutcome``.
    inbound_checks: Any = None
    # DKIM signing of submitted mail bound for the outbound queue
    # (policy/dkim_sign.py): ``wrap(queue_writer) -> writer``; None: no signing.
    dkim_signer: Any = None
    # Sender Rewriting Scheme for mail aliases forward off-site (policy/srs.py).
    srs: Srs | None = None
    # The free-space reserve ([limits] min_free_space): MAIL FROM asks ``low()``.
    space: FreeSpaceGuard | None = None
    # Mailbox quotas ([limits] mailbox_quota, `user quota`): RCPT and DATA ask it.
    quota: QuotaTracker | None = None
    # Open POP3 mailbox locks, by mailbox path (policy for RFC 1939 §8 exclusivity).
    extras: dict[str, Any] = field(default_factory=dict)

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.settings.domains or self.accounts.is_local_domain(domain)
