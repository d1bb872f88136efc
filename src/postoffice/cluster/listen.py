"""A thread that LISTENs on one channel and keeps doing so across outages.

The shared login throttle and the DKIM keys each follow a NOTIFY channel
from a thread of their own; this is the loop they share: connect, LISTEN,
hand the connection over, and when it is lost say so once, reconnect with
a bounded backoff (0.5 s doubling to 10 s) and say once that it is back.
(The account store, older, has the same loop inline.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from postoffice.cluster.db import ClusterError, connect, describe

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

RECONNECT_MIN = 0.5
RECONNECT_MAX = 10.0


class Listener:
    """Runs ``follow(conn)`` on a LISTENing connection until ``close``;
    ``follow`` returns when ``stopping`` is set, or raises when the
    connection fails (then a new one is made and ``follow`` called again:
    notifications sent meanwhile are gone, so it should catch up first)."""

    def __init__(
        self,
        url: str,
        channel: str,
        follow: Callable[[Connection], None],
        *,
        log: logging.Logger,
        what: str,
        name: str,
    ) -> None:
        self._url = url
        self._channel = channel
        self._follow = follow
        self._log = log
        self._what = what  # "serving the keys last read": what the node does meanwhile
        self.stopping = threading.Event()
        self.listening = threading.Event()  # set while LISTENing (tests wait for it)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        delay = RECONNECT_MIN
        lost = False
        while not self.stopping.is_set():
            try:
                with connect(self._url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self.listening.set()
                    if lost:
                        self._log.warning("[cluster] database reachable again")
                    lost, delay = False, RECONNECT_MIN
                    self._follow(conn)
            except (ClusterError, psycopg.Error) as exc:
                self.listening.clear()
                if self.stopping.is_set():
                    break
                if not lost:
                    self._log.error(
                        "lost the [cluster] database (%s); %s, reconnecting",
                        describe(exc),
                        self._what,
                    )
                lost = True
            self.stopping.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def close(self, timeout: float = 3.0) -> None:
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
