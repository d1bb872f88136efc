"""Read-ahead for clients that FETCH one whole message per command, in order.

mbsync (and other sync tools) pull a folder as ``UID FETCH 1 (BODY.PEEK[])``,
``UID FETCH 2 ...``, pipelined: one command per message.  Each would cost
the session an executor hop of its own (a thread wake-up each way, more CPU
than reading the file: ``bench/run.py`` row ``imap-10k-mbsync-full``, 170 us
of server CPU per message against Dovecot's 60).  Like the kernel's file
read-ahead, once two such FETCHes came in sequence-number order, the hop
that reads the second also reads the next few messages of the view, and
their FETCHes are answered from here without a hop.

What is held is the message text only (a Maildir file's content never
changes for a UID; flags come from the session's records as always), at
most ``MAX_MESSAGES`` messages and ``MAX_BYTES`` octets, and it is dropped
at the first command that is not such a FETCH (``clear``).  A client that
fetches single messages out of order gets no read-ahead at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from postoffice.protocol.imap_fetch import FetchMessage
from postoffice.storage.imap_index import MessageRecord

MAX_MESSAGES = 16
MAX_BYTES = 1024 * 1024


class ReadAhead:
    __slots__ = ("_expected", "_held")

    def __init__(self) -> None:
        self._expected = 0  # the UID a sequential client asks for next (0: none)
        self._held: dict[int, FetchMessage] = {}

    def clear(self) -> None:
        self._expected = 0
        self._held = {}

    def take(self, uid: int, uids: Sequence[int]) -> FetchMessage | None:
        """The message of ``uid`` if it was read ahead (then forgotten here);
        ``uids``: the view's UIDs, ascending, for what comes next."""
        message = self._held.pop(uid, None)
        if message is not None:
            self._expect_after(uid, uids)
        return message

    def plan(
        self, uid: int, uids: Sequence[int], records: dict[int, MessageRecord], ghosts: set[int]
    ) -> list[MessageRecord]:
        """The messages to read along with ``uid`` (not held): the ones after
        it in the view when the client is going through it in order, else
        none."""
        sequential = self._expected == uid
        self._held = {}
        if not sequential:
            self._expect_after(uid, uids)
            return []
        start = bisect.bisect_right(uids, uid)
        along: list[MessageRecord] = []
        size = 0
        for next_uid in uids[start : start + MAX_MESSAGES]:
            record = records.get(next_uid)
            if record is None or next_uid in ghosts:
                continue
            size += record.size
            if size > MAX_BYTES:
                break
            along.append(record)
        self._expect_after(uid, uids)
        return along

    def keep(self, messages: dict[int, FetchMessage | None]) -> None:
        """Hold what ``plan``'s records read as (None: gone, not held)."""
        self._held = {uid: m for uid, m in messages.items() if m is not None}

    def _expect_after(self, uid: int, uids: Sequence[int]) -> None:
        at = bisect.bisect_right(uids, uid)
        self._expected = uids[at] if at < len(uids) else 0
