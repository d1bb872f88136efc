"""Reusing SMTP connections to a destination (as Postfix's connection cache does).

After a complete transaction the client is parked here under its
destination (domain, or the smarthost); the next message for the same
destination within ``idle`` seconds skips connect, greeting, EHLO and
STARTTLS.  RFC 5321 §4.1.1.4: the end of DATA resets the transaction, so a
parked connection is ready for the next MAIL.  Connections are used at most
``max_uses`` times and the cache holds at most ``max_parked``; an expired
one is closed with QUIT.  A parked connection remembers the kind of TLS
policy it was opened under (``tls_kind``) so that a later message is not
sent over less TLS than its own policy asks for (remote.py checks it with
``TlsPolicy.reusable``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from postoffice.delivery.smtp_connection import SmtpClient

IDLE = 2.0  # seconds a parked connection waits for the next message
MAX_USES = 100  # transactions per connection before it is closed


@dataclass(eq=False)
class Parked:
    client: SmtpClient
    host: str  # the host name it was reached by (MX, smarthost)
    label: str  # "host[ip]:port", for logs
    tls_kind: str = ""  # the TlsPolicy kind it was opened under (tls_policy.py)
    uses: int = 1
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class ConnectionCache:
    def __init__(self, idle: float = IDLE, max_uses: int = MAX_USES, max_parked: int = 50) -> None:
        self._idle = idle
        self._max_uses = max_uses
        self._max_parked = max_parked
        self._parked: dict[str, list[Parked]] = {}
        self._count = 0
        self._closing: set[asyncio.Task[None]] = set()

    def has(self, key: str) -> bool:
        """Whether anything is parked for ``key`` (stale or not)."""
        return key in self._parked

    def discard(self, parked: Parked) -> None:
        """Close a connection taken but not wanted (its TLS falls short)."""
        self._close_later(parked)

    def take(self, key: str) -> Parked | None:
        """The most recently parked live connection for ``key``, if any."""
        items = self._parked.get(key)
        for _ in range(len(items or ())):
            assert items is not None
            parked = items.pop()
            self._count -= 1
            if parked.timer is not None:
                parked.timer.cancel()
            if not items:
                del self._parked[key]
            if parked.client.usable:
                return parked
            self._close_later(parked)
            items = self._parked.get(key)
            if not items:
                break
        return None

    def park(self, key: str, parked: Parked) -> bool:
        """Keep ``parked`` for reuse; False when it should be closed instead."""
        if (
            self._idle <= 0
            or parked.uses >= self._max_uses
            or self._count >= self._max_parked
            or not parked.client.usable
        ):
            return False
        loop = asyncio.get_running_loop()
        parked.timer = loop.call_later(self._idle, self._expire, key, parked)
        self._parked.setdefault(key, []).append(parked)
        self._count += 1
        return True

    def _expire(self, key: str, parked: Parked) -> None:
        items = self._parked.get(key, [])
        if parked in items:
            items.remove(parked)
            self._count -= 1
            if not items:
                del self._parked[key]
        self._close_later(parked)

    def _close_later(self, parked: Parked) -> None:
        task = asyncio.get_running_loop().create_task(parked.client.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every parked connection (at shutdown)."""
        for items in list(self._parked.values()):
            for parked in items:
                if parked.timer is not None:
                    parked.timer.cancel()
                self._close_later(parked)
        self._parked.clear()
        self._count = 0
        if self._closing:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._closing, return_exceptions=True)
