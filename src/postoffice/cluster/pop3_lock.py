"""POP3 maildrop locks that every node honours: PostgreSQL advisory locks.

RFC 1939 §8 allows one TRANSACTION session per maildrop.  The Maildir's
``flock`` keeps it on one machine; with several nodes a session also takes
``pg_try_advisory_lock`` on a key made from the account, so a session on
node A makes node B answer ``-ERR [IN-USE]``.

Session-level advisory locks belong to the database connection that took
them, and PostgreSQL drops them when that connection ends: a node killed
(even with -9) frees its maildrops as soon as the kernel closes its socket.
One connection per process holds all of the process's locks; the flock,
taken first, keeps two sessions of one node from reaching it for the same
maildrop (advisory locks nest within one connection, so they would not).

Taking a lock blocks (the POP3 session calls it through the executor, with
the flock); releasing never does (the session releases from the event
loop): unlocks go to a thread of their own, in order.  When the connection
is lost, every lock it held is gone with it: ``verify`` (asked before
UPDATE) says so, and the session's UPDATE changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from postoffice.cluster.db import ClusterError, connect, describe
from postoffice.storage.pop3_mailbox import MailboxBusy

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

log = logging.getLogger("postoffice.cluster.pop3_lock")


def lock_key(account: str) -> int:
    """The advisory lock key (signed 64-bit) for POP3 on ``account``."""
    digest = hashlib.sha256(b"postoffice-pop3\0" + account.lower().encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class ClusterLock:
    """One maildrop's advisory lock, held by the process's lock connection."""

    def __init__(self, keeper: ClusterMaildropLocks, key: int, generation: int) -> None:
        self._keeper = keeper
        self._key = key
        self._generation = generation
        self._released = False

    def verify(self) -> bool:
        return not self._released and self._keeper._alive(self._generation)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._keeper._unlock_later(self._key, self._generation)


class ClusterMaildropLocks:
    """``MaildropLocks`` (storage/pop3_mailbox.py) on PostgreSQL."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._mutex = threading.Lock()  # the connection, one statement at a time
        self._conn: Connection | None = None
        self._generation = 0  # counts connections: locks of an older one are gone
        self._unlocker = ThreadPoolExecutor(1, thread_name_prefix="postoffice-pop3-unlock")

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                log.warning("[cluster] POP3 lock connection lost; its maildrop locks are gone")
                self._conn.close()
            self._conn = connect(self._url, autocommit=True)
            self._generation += 1
        return self._conn

    def acquire(self, account: str) -> ClusterLock:
        import psycopg

        key = lock_key(account)
        with self._mutex:
            # Twice: a connection that stood idle while PostgreSQL restarted
            # shows it is dead only when used; then a new one is made.
            for attempt in (1, 2):
                try:
                    conn = self._connection()
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                    break
                except (ClusterError, psycopg.Error) as exc:
                    if attempt == 2 or isinstance(exc, ClusterError):
                        raise OSError(
                            errno.EAGAIN, f"[cluster] POP3 lock: {describe(exc)}"
                        ) from None
            generation = self._generation
        if not row or not row[0]:
            raise MailboxBusy(account)
        return ClusterLock(self, key, generation)

    def _alive(self, generation: int) -> bool:
        """Whether the connection that took a lock of ``generation`` still
        stands (a round trip: a dead peer shows only when asked)."""
        import psycopg

        with self._mutex:
            conn = self._conn
            if conn is None or generation != self._generation or conn.closed:
                return False
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                return False
            return True

    def _unlock_later(self, key: int, generation: int) -> None:
        # After close(): the connection is closed, and the lock went with it.
        with contextlib.suppress(RuntimeError):
            self._unlocker.submit(self._unlock, key, generation)

    def _unlock(self, key: int, generation: int) -> None:
        import psycopg

        with self._mutex:
            conn = self._conn
            if conn is None or generation != self._generation or conn.closed:
                return  # that connection, and every lock it held, is gone
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.Error as exc:
                log.warning("[cluster] POP3 unlock: %s", describe(exc))

    def close(self) -> None:
        self._unlocker.shutdown(wait=True)
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
