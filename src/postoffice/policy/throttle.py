"""Failed-login throttling: who may have a password checked now, later, or not at all.

Pure policy with an injected clock (no sleeping, no I/O): ``admit`` says how
long an attempt waits before its password is checked, how long a wrong
password's answer is held, or that the attempt is refused unchecked; the
caller (``Authenticator``) sleeps, checks and reports back with
``succeeded``, ``failed`` or ``abandoned``.

Why this shape (issues 11 and 19):

* **The failing pair first.**  Penalties belong to the (client, account)
  pair that fails, so one phone with a stale password behind an office NAT
  slows only itself, not the colleagues on the same address.  After
  ``free_failures`` failures a pair's wrong passwords are answered slowly
  (1 s, doubling, at most ``max_delay``), and its attempts take turns: one is
  in flight at a time, so parallel connections guess no faster.  A right
  password is never held for the pair's own failures: it is checked as soon
  as it is the pair's turn and answered at once, and it clears the pair.
* **Budgets as backstops.**  Delays alone do not limit a rate: 240
  addresses guessing once each were all judged within 41 s.  So failures
  are also counted per account (over all addresses), per client address
  (over all accounts) and in all, each against a budget of N per ``window``.
  A budget is a GCRA leaky bucket (RFC 2475's token bucket seen from the
  other side): a burst of N, then one more every window/N.  An attempt a
  spent budget covers waits for its slot; one whose slot is further away
  than ``max_delay`` is refused at once, unchecked (SMTP 454 4.7.0, RFC 4954
  §6; POP3 -ERR [SYS/TEMP], RFC 3206 §4: try later, the credentials may be
  fine).  So no client is held longer than ``max_delay``, refused attempts
  cost no hashing, and in the long run an account sees at most its budget's
  guesses, however many addresses guess.
* **Known-good pairs.**  A (client, account) pair that logged in within
  ``known_good_for`` is exempt from the three budgets: the owner's usual
  address still gets in at once while the account is under a distributed
  attack (an attacker cannot forge a TCP source address).  Its own pair
  penalty still applies.
* **Clients are IPv4 addresses or IPv6 /64s** (``policy/clients.py``), the
  same key as the connection cap, so rotating through a /64 gains nothing.
* **A repeated wrong password is no new guess** (as Dovecot's auth
  penalty): a pair that sends exactly its last wrong password again (a
  stale client retrying) is answered "failed" at once, unchecked and
  uncounted, so it neither burns CPU nor throttles the owner's other
  devices behind the same address.  The pair keeps a 32-bit keyed tag of
  that password and of the stored hash it failed against (so a password
  change makes it a new guess), never the password.
* **A success does not clear the address's or the account's budget**: one
  valid account would otherwise whitewash an address for guessing at
  others.  It refunds its own booking, clears its pair and makes the pair
  known-good, which is what lets the owner through.
* **Logged once per key** when throttling starts (a pair's failures begin
  to be slowed, a budget is spent), not per attempt.
* **Memory is bounded**: each table holds at most ``max_entries`` keys
  (stale ones go first, then the oldest); an empty bucket is the same as no
  entry, so forgetting one loses nothing.  Entries are made only by judged
  attempts, which the global budget limits in the first place.
* **Several nodes** (``[cluster]``, issue 17) share what they learn through
  an injected ``ThrottleFeed`` (cluster/throttle_feed.py): each judged
  failure is handed to it, and so is a pair that becomes known-good (or whose
  mark is half-way to expiring); what the other nodes sent is booked before
  the next attempt is judged.  So failures spread over nodes count as on one,
  and the owner's address stays exempt on the node it moves to.  The feed
  does its network work in a thread of its own: nothing here waits for it,
  and the common success (a pair known-good already) tells it nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from postoffice import logfmt
from postoffice.config.settings import AuthSettings
from postoffice.policy.clients import client_key

log = logging.getLogger("postoffice.auth")

MAX_ENTRIES = 100_000  # per table (pairs, each budget, known-good pairs)

K = TypeVar("K")
V = TypeVar("V")


FAILED, KNOWN_GOOD = "f", "g"  # what a ThrottleFeed event says of a pair


class ThrottleFeed(Protocol):
    """Throttle events shared with other nodes; neither call may block."""

    def publish(self, event: str, client: str, account: str) -> None:
        """``FAILED`` or ``KNOWN_GOOD``, judged here (``client`` as ``client_key``
        made it)."""

    def received(self) -> list[tuple[str, str, str, float]]:
        """Other nodes' events since the last call: (event, client, account,
        when), ``when`` on the throttle's clock."""
        return []


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """The ``[auth] throttle_*`` settings (config/settings.py documents each)."""

    free_failures: int = 3
    max_delay: float = 30.0
    window: float = 900.0
    account_failures: int = 10
    address_failures: int = 30
    global_failures: int = 300
    known_good_for: float = 30 * 86400.0
    max_entries: int = MAX_ENTRIES

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> ThrottleLimits:
        return cls(
            free_failures=auth.throttle_after,
            max_delay=auth.throttle_max_delay,
            window=auth.throttle_window,
            account_failures=auth.throttle_account_failures,
            address_failures=auth.throttle_address_failures,
            global_failures=auth.throttle_global_failures,
            known_good_for=auth.throttle_known_good,
        )


@dataclass(slots=True)
class _Pair:
    """One (client, account) pair's failures since its last success."""

    failures: int = 0
    pending: int = 0  # admitted attempts not yet settled
    last: float = 0.0  # the latest failure
    free_at: float = 0.0  # when the pair's next attempt may be checked
    tag: bytes = b""  # of the latest wrong password (see the module docstring)
    logged: bool = False


@dataclass(slots=True)
class _Bucket:
    tat: float  # GCRA "theoretical arrival time": empty once it is in the past
    logged: bool = False


class _Budget:
    """``limit`` failures per ``window`` for each key, as a GCRA leaky bucket."""

    def __init__(self, name: str, limit: int, window: float, max_entries: int) -> None:
        self.name = name
        self.enabled = limit > 0
        self.interval = window / limit if limit > 0 else 0.0  # one failure drains per this
        self.tolerance = window - self.interval  # a burst of ``limit``
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self.buckets: dict[str, _Bucket] = {}

    def earliest(self, key: str, now: float) -> float:
        """When an attempt under ``key`` may next be checked (``now``: at once)."""
        bucket = self.buckets.get(key)
        return now if bucket is None else max(now, bucket.tat - self.tolerance)

    def spent(self, key: str, client: str, account: str) -> None:
        """The budget holds attempts back: say so once per episode."""
        bucket = self.buckets.get(key)
        if bucket is None or bucket.logged:
            return
        bucket.logged = True
        who = {"account": f"user={logfmt.field(account)}", "address": f"client={client}"}.get(
            self.name, ""
        )
        log.warning(
            "auth throttle: %s budget spent%s: over %d failed logins in %.0f s;"
            " logins it covers wait their turn (one per %.1f s) or are refused for now,"
            " known-good address+user pairs are exempt",
            self.name,
            f" {who}" if who else "",
            self.limit,
            self.window,
            self.interval,
        )

    def book(self, key: str, start: float) -> None:
        """One more failure, counted from ``start`` (refunded if it turns out right)."""
        bucket = self.buckets.pop(key, None)
        if bucket is None:
            _make_room(self.buckets, self.max_entries, lambda b: b.tat <= start)
            bucket = _Bucket(start)
        bucket.tat = max(bucket.tat, start) + self.interval
        self.buckets[key] = bucket  # re-inserted: dict order is least recently booked first

    def refund(self, key: str, now: float) -> None:
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.tat -= self.interval
            if bucket.tat <= now:
                del self.buckets[key]


@dataclass(slots=True)
class Admission:
    """What ``admit`` decided for one attempt; hand it back to settle it."""

    pair_key: tuple[str, str]
    pair: _Pair | None
    tag: bytes
    known_good: bool = False
    # Not checked at all: the name of what refused it ("pair", "account",
    # "address", "global"): answer "try later".
    refused_by: str | None = None
    # The same wrong password as the pair's last failure: answer "failed" now.
    repeat: bool = False
    wait: float = 0.0  # seconds before the password is checked
    fail_delay: float = 0.0  # further seconds before a "failed" answer
    booked: list[tuple[_Budget, str]] = field(default_factory=list)
    settled: bool = False


class LoginThrottle:
    """See the module docstring.  ``account`` is the normalised account name,
    or "" when the name given was no account name at all."""

    def __init__(
        self,
        limits: ThrottleLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        feed: ThrottleFeed | None = None,
    ) -> None:
        self.limits = lim = limits or ThrottleLimits()
        self._clock = clock
        self._feed = feed
        self._pairs: dict[tuple[str, str], _Pair] = {}
        self._known_good: dict[tuple[str, str], float] = {}
        self._account = _Budget("account", lim.account_failures, lim.window, lim.max_entries)
        self._address = _Budget("address", lim.address_failures, lim.window, lim.max_entries)
        self._global = _Budget("global", lim.global_failures, lim.window, lim.max_entries)

    # --- deciding ----------------------------------------------------------------
    def admit(self, client_ip: str, account: str, tag: bytes = b"") -> Admission:
        if self._feed is not None:
            self._absorb(self._feed)
        now = self._clock()
        client = client_key(client_ip)
        pair_key = (client, account)
        pair = self._live_pair(pair_key, now)
        if pair is not None and tag and pair.failures and tag == pair.tag:
            return Admission(pair_key, pair, tag, repeat=True)
        known = self.is_known_good(client_ip, account)
        ahead = (pair.failures + pair.pending) if pair else 0
        fail_delay = self._delay(ahead + 1)
        start, refused_by = now, None
        if pair is not None and pair.free_at > now:
            start, refused_by = pair.free_at, "pair"
        gates = [] if known else self._gates(client, account)
        for budget, key in gates:
            earliest = budget.earliest(key, now)
            if earliest > now:
                budget.spent(key, client, account)
            if earliest > start:
                start, refused_by = earliest, budget.name
        wait = start - now
        if wait + fail_delay > self.limits.max_delay:
            return Admission(pair_key, pair, tag, known_good=known, refused_by=refused_by)
        for budget, key in gates:
            budget.book(key, start)
        if pair is None:
            _make_room(
                self._pairs,
                self.limits.max_entries,
                lambda p: not p.pending and (not p.failures or now - p.last > self.limits.window),
            )
            pair = self._pairs[pair_key] = _Pair()
        pair.pending += 1
        if fail_delay:
            pair.free_at = start + fail_delay  # the next attempt's turn, if this one fails
            if not pair.logged:
                pair.logged = True
                log.warning(
                    "auth throttle: client=%s user=%s: %d failed logins; further wrong"
                    " passwords are answered after up to %.0f s, one attempt at a time",
                    client,
                    logfmt.field(account or "-"),
                    ahead,
                    self.limits.max_delay,
                )
        return Admission(pair_key, pair, tag, known, wait=wait, fail_delay=fail_delay, booked=gates)

    def is_known_good(self, client_ip: str, account: str) -> bool:
        pair_key = (client_key(client_ip), account)
        when = self._known_good.get(pair_key)
        if when is None:
            return False
        if self._clock() - when > self.limits.known_good_for:
            del self._known_good[pair_key]
            return False
        return True

    # --- settling -----------------------------------------------------------------
    def succeeded(self, admission: Admission) -> None:
        if not self._settle(admission):
            return
        now = self._clock()
        for budget, key in admission.booked:
            budget.refund(key, now)
        pair = admission.pair
        if pair is not None:
            pair.failures, pair.tag, pair.logged = 0, b"", False
            pair.free_at = min(pair.free_at, now)
            if not pair.pending and self._pairs.get(admission.pair_key) is pair:
                del self._pairs[admission.pair_key]
        if self.limits.known_good_for > 0 and admission.pair_key[1]:
            before = self._known_good.pop(admission.pair_key, None)
            if self._feed is not None and (
                before is None or now - before > self.limits.known_good_for / 2
            ):
                self._feed.publish(KNOWN_GOOD, *admission.pair_key)
            _make_room(
                self._known_good,
                self.limits.max_entries,
                lambda t: now - t > self.limits.known_good_for,
            )
            self._known_good[admission.pair_key] = now

    def failed(self, admission: Admission) -> None:
        if not self._settle(admission):
            return
        now = self._clock()
        if not admission.booked:  # exempt (known-good): counted all the same
            for budget, key in self._gates(*admission.pair_key):
                budget.book(key, now)
        pair = admission.pair
        if pair is not None:
            pair.failures += 1
            pair.last = now
            pair.tag = admission.tag
        if self._feed is not None:
            self._feed.publish(FAILED, *admission.pair_key)

    def _absorb(self, feed: ThrottleFeed) -> None:
        for event, client, account, when in feed.received():
            if event == FAILED:
                self.remote_failure(client, account, when)
            elif event == KNOWN_GOOD and account and self.limits.known_good_for > 0:
                self.remote_known_good(client, account, when)

    def remote_known_good(self, client: str, account: str, when: float) -> None:
        """Another node let this pair in at ``when``: exempt here too."""
        pair_key = (client, account)
        if self._known_good.get(pair_key, when) > when:
            return  # a later success here already
        self._known_good.pop(pair_key, None)
        _make_room(
            self._known_good,
            self.limits.max_entries,
            lambda t: when - t > self.limits.known_good_for,
        )
        self._known_good[pair_key] = when

    def remote_failure(self, client: str, account: str, when: float) -> None:
        """A failure another node judged at ``when``: booked as if judged here,
        but without the wrong password's tag (it stays on that node)."""
        for budget, key in self._gates(client, account):
            budget.book(key, when)
        pair_key = (client, account)
        pair = self._live_pair(pair_key, when)
        if pair is None:
            _make_room(
                self._pairs,
                self.limits.max_entries,
                lambda p: not p.pending and (not p.failures or when - p.last > self.limits.window),
            )
            pair = self._pairs[pair_key] = _Pair()
        pair.failures += 1
        pair.last = max(pair.last, when)
        # That node held its answer this long; the pair's next turn, here too.
        pair.free_at = max(pair.free_at, when + self._delay(pair.failures))

    def abandoned(self, admission: Admission) -> None:
        """Given up before the password was checked (the client left, the
        hashing queue was full): nothing was judged, so nothing counts."""
        if not self._settle(admission):
            return
        now = self._clock()
        for budget, key in admission.booked:
            budget.refund(key, now)

    # --- internals ----------------------------------------------------------------
    def _settle(self, admission: Admission) -> bool:
        """Mark settled once; False for a refused or repeated attempt or a second call."""
        if admission.settled or admission.refused_by or admission.repeat:
            return False
        admission.settled = True
        if admission.pair is not None:
            admission.pair.pending -= 1
        return True

    def _gates(self, client: str, account: str) -> list[tuple[_Budget, str]]:
        gates = [(self._address, client), (self._global, "")]
        if account:
            gates.insert(0, (self._account, account))
        return [(budget, key) for budget, key in gates if budget.enabled]

    def _delay(self, failure: int) -> float:
        """How long the answer to a pair's ``failure``-th wrong password is held."""
        extra = failure - self.limits.free_failures
        if extra <= 0:
            return 0.0
        return min(self.limits.max_delay, float(2 ** min(extra - 1, 30)))

    def _live_pair(self, pair_key: tuple[str, str], now: float) -> _Pair | None:
        pair = self._pairs.get(pair_key)
        if pair is not None and not pair.pending and now - pair.last > self.limits.window:
            del self._pairs[pair_key]  # its failures are forgotten
            return None
        return pair


def _make_room(table: dict[K, V], limit: int, stale: Callable[[V], bool]) -> None:
    """Before adding a key: drop stale entries, then the oldest, to stay under ``limit``."""
    if len(table) < limit:
        return
    for key in [k for k, v in table.items() if stale(v)]:
        del table[key]
    if len(table) >= limit:  # still full: the oldest tenth goes (no sweep per insert)
        for key in list(table)[: len(table) - limit + 1 + limit // 10]:
            del table[key]
