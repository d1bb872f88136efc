"""The free-space reserve: refuse new mail (452 4.3.1) before the disk is full.

A full disk is answered 452 after the data (``maildir.py``, the queue), but
by then the client has sent the whole message, and everything else that
needs a little room -- queue state, the accounts database, POP3 UPDATE --
fails with it.  Like Postfix's ``queue_minfree``, new transactions are
refused at MAIL FROM while the file systems holding the data directory, the
Maildirs or the queue have less than ``[limits] min_free_space`` bytes free
for unprivileged users (``f_bavail``); a ``SIZE=`` (RFC 1870 §6.1) that would
take the free space below the reserve is refused the same way.  Sessions
already past MAIL go on: the reserve is what they write into.

The answer must cost nothing per message on the event loop: the sessions
read a cached figure, and a ``statvfs`` of each path (microseconds) runs in
the I/O pool at most once per ``REFRESH_SECONDS``, started by the first
question after the figure has aged.  A path that cannot be examined (not
made yet) is left out rather than refusing mail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

log = logging.getLogger("postoffice.storage")

REFRESH_SECONDS = 1.0


class FreeSpaceGuard:
    def __init__(
        self,
        paths: Sequence[Path],
        reserve: int,
        executor: Executor,
        *,
        refresh: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self.reserve = reserve
        self._executor = executor
        self._refresh = refresh
        self._clock = clock
        self._free: int | None = None  # the least free space among the paths
        self._checked = float("-inf")
        self._pending = False
        self._was_low = False

    def free_blocking(self) -> int | None:
        """Bytes free for unprivileged users on the fullest of the file systems."""
        free: int | None = None
        for path in self.paths:
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            here = st.f_bavail * st.f_frsize
            free = here if free is None else min(free, here)
        return free

    def refresh_blocking(self) -> None:
        """Measure now (blocking; at start-up, before the loop runs)."""
        self._update(self.free_blocking())

    def low(self, size: int = 0) -> bool:
        """Is the free space, less ``size`` octets to come, below the reserve?
        Answers from the cached figure; refreshes it in the background when
        it has aged.  Call from the event loop."""
        if self.reserve <= 0:
            return False
        if not self._pending and self._clock() - self._checked >= self._refresh:
            self._pending = True
            future = asyncio.get_running_loop().run_in_executor(self._executor, self.free_blocking)
            future.add_done_callback(self._measured)
        free = self._free
        return free is not None and free - max(size, 0) < self.reserve

    def _measured(self, future: asyncio.Future[int | None]) -> None:
        self._pending = False
        if future.cancelled() or future.exception() is not None:
            self._checked = self._clock()  # try again later, keep the last figure
            return
        self._update(future.result())

    def _update(self, free: int | None) -> None:
        self._free, self._checked = free, self._clock()
        low = free is not None and free < self.reserve
        if low != self._was_low:
            self._was_low = low
            if low:
                log.warning(
                    "free space %d bytes is below the reserve of %d ([limits] min_free_space):"
                    " new mail is refused with 452 4.3.1",
                    free,
                    self.reserve,
                )
            else:
                log.info("free space %s bytes: above the reserve again, accepting mail", free)
