"""A budget of memory that all sessions of a process share for one purpose.

Why: the inbound checks (policy/mailauth.py) need a message whole before
its verdict header can go on top (DKIM hashes the body), so the SMTP
session holds such messages in memory instead of streaming them to disk.
Each is bounded by the size limit, but a few hundred sessions at once are
not: past the budget a message is answered 452 and not kept, rather than
the process running out of memory.  Event loop only (no locking).
"""

from __future__ import annotations

# All sessions together hold at most this much of messages kept whole in
# memory for inbound checks.
MAX_HELD_BYTES = 256 * 1024 * 1024


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (and nothing reserved) if that would
        go past the limit."""
        if self.in_use + size > self.limit:
            return False
        self.in_use += size
        return True

    def give_back(self, size: int) -> None:
        """Return ``size`` bytes that ``take`` reserved."""
        self.in_use -= size
