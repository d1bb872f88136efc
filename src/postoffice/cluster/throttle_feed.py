"""Failed logins shared between nodes: the login throttle's ``ThrottleFeed`` on
PostgreSQL NOTIFY.

The throttle (policy/throttle.py) is asked on every login and must stay off
the network, so its state is replicated rather than centralised: every
node keeps its own ``LoginThrottle``, and each judged failure is sent to
the others with ``NOTIFY postoffice_throttle``; each node books the failures
it hears into its own pair and budgets.  Thirty wrong passwords spread over
two nodes are then throttled as thirty on one.  A pair that becomes
known-good is sent too, so the owner's address stays exempt from the
(shared, hence spent everywhere) budgets on whichever node it reaches.

Nothing here runs on the event loop: ``publish`` appends to a deque and
``received`` empties one (both non-blocking, bounded); a thread of its own
holds one connection that LISTENs, sends what was published (several
failures per notification) and receives.  Its own notifications come back
to it and are told apart by the sending backend's pid.  A success of a pair
known-good already, by far the common case, sends nothing.

While the database is away failures stay on the node that judged them
(what was published meanwhile is kept up to ``MAX_QUEUED`` and sent on
reconnecting, to the nodes listening again by then: NOTIFY is not stored
for a listener that comes later; what other nodes sent meanwhile is lost).  The budgets are
backstops with windows of minutes: briefly counting on one node only is
the embedded behaviour, not a hole.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from postoffice.cluster.listen import Listener
from postoffice.policy.throttle import FAILED, KNOWN_GOOD

if TYPE_CHECKING:
    from postoffice.cluster.db import Connection

log = logging.getLogger("postoffice.cluster.throttle")

CHANNEL = "postoffice_throttle"
POLL_SECONDS = 0.05  # how long a published failure may wait to be sent
MAX_QUEUED = 10_000  # each way; beyond it the oldest are dropped
MAX_PAYLOAD = 7000  # bytes per NOTIFY (PostgreSQL's limit is 8000)
MAX_FIELD = 512  # a client key or account name longer than this is not sent

T = TypeVar("T")


def encode(events: list[tuple[str, str, str]]) -> list[str]:
    """Payloads of at most ``MAX_PAYLOAD`` bytes: JSON lists of [event, client,
    account]."""
    payloads: list[str] = []
    batch: list[list[str]] = []
    size = 2
    for event, client, account in events:
        if len(client) > MAX_FIELD or len(account) > MAX_FIELD:
            continue
        item = [event, client, account]
        length = len(_json(item)) + 1  # and its comma: exact, as _json writes ASCII
        if batch and size + length > MAX_PAYLOAD:
            payloads.append(_json(batch))
            batch, size = [], 2
        batch.append(item)
        size += length
    if batch:
        payloads.append(_json(batch))
    return payloads


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def decode(payload: str) -> list[tuple[str, str, str]]:
    """The events in a payload; malformed or unknown ones (another release?)
    skipped."""
    try:
        items = json.loads(payload)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    return [
        (item[0], item[1], item[2])
        for item in items
        if isinstance(item, list)
        and len(item) == 3
        and item[0] in (FAILED, KNOWN_GOOD)
        and isinstance(item[1], str)
        and isinstance(item[2], str)
    ]


class SharedFailures:
    """``ThrottleFeed`` (policy/throttle.py) through PostgreSQL; ``clock`` must
    be the throttle's."""

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._outbox: deque[tuple[str, str, str]] = deque(maxlen=MAX_QUEUED)
        self._inbox: deque[tuple[str, str, str, float]] = deque(maxlen=MAX_QUEUED)
        self._listener = Listener(
            url,
            CHANNEL,
            self._exchange,
            log=log,
            what="failed logins are counted on this node only until it is back",
            name="postoffice-throttle-feed",
        )
        self.listening = self._listener.listening

    def start(self) -> None:
        self._listener.start()

    # --- the throttle's side (event loop): deque operations only -------------------------
    def publish(self, event: str, client: str, account: str) -> None:
        self._outbox.append((event, client, account))

    def received(self) -> list[tuple[str, str, str, float]]:
        return _drain(self._inbox)

    # --- the thread ----------------------------------------------------------------------
    def _exchange(self, conn: Connection) -> None:
        import psycopg

        own_pid = conn.info.backend_pid  # our own notifications come back: skipped
        while not self._listener.stopping.is_set():
            events = _drain(self._outbox)
            if events:
                try:
                    for payload in encode(events):
                        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                except psycopg.Error:
                    self._outbox.extendleft(reversed(events))  # sent on reconnecting
                    raise
            for notify in conn.notifies(timeout=POLL_SECONDS):
                if notify.pid == own_pid:
                    continue
                when = self._clock()
                for event, client, account in decode(notify.payload):
                    self._inbox.append((event, client, account, when))

    def close(self) -> None:
        self._listener.close()


def _drain(box: deque[T]) -> list[T]:
    """Everything in ``box`` now; safe against the other thread appending
    (deque appends and pops are atomic)."""
    got: list[T] = []
    while box:
        try:
            got.append(box.popleft())
        except IndexError:
            break
    return got
