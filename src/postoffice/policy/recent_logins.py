"""The last successful logins of each account, for its owner to see (/account).

"Recent logins, with their addresses" lets a mailbox owner notice a login
that was not theirs.  Kept in the serving process's memory only (the mail
log has the full record): at most ``PER_ACCOUNT`` per account and
``MAX_ACCOUNTS`` accounts, the least recently active forgotten first, so a
flood of logins cannot grow it.  Pure, with an injected clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

PER_ACCOUNT = 10
MAX_ACCOUNTS = 10_000


@dataclass(frozen=True, slots=True)
class Login:
    time: float  # time.time()
    protocol: str  # "smtp", "pop3", "imap", "web"
    client: str  # the client's IP address


class RecentLogins:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        per_account: int = PER_ACCOUNT,
        max_accounts: int = MAX_ACCOUNTS,
    ) -> None:
        self._clock = clock
        self._per_account = per_account
        self._max_accounts = max_accounts
        self._table: OrderedDict[str, deque[Login]] = OrderedDict()

    def record(self, account: str, protocol: str, client: str) -> None:
        account = account.lower()  # account names match in any case
        logins = self._table.pop(account, None) or deque(maxlen=self._per_account)
        logins.append(Login(self._clock(), protocol, client))
        self._table[account] = logins
        while len(self._table) > self._max_accounts:
            self._table.popitem(last=False)

    def of(self, account: str) -> list[Login]:
        """Newest first."""
        return list(reversed(self._table.get(account.lower(), ())))
