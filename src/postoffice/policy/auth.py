"""Password hashing, verification off the event loop, and failed-login throttling.

Passwords are stored only as argon2id hashes (argon2-cffi).  Verification
costs tens of milliseconds of CPU by design, so it runs in a thread pool
(the C code releases the GIL) and never stalls other sessions; at most one
verification per CPU runs at once (more would only add 64 MiB each and take
the shared pool's threads from file I/O).  Hashes with one lane (``p=1``, our
default, and Dovecot's) are verified by libsodium (PyNaCl) where installed:
its vectorised argon2 needs about half the CPU of argon2-cffi's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from postoffice import logfmt
from postoffice.mail.address import Address

try:
    from nacl.exceptions import InvalidkeyError as _NaclMismatch
    from nacl.pwhash import argon2id as _sodium_argon2id
except ImportError:  # pragma: no cover - PyNaCl is a dependency; still optional here
    _sodium_argon2id = None  # type: ignore[assignment]

log = logging.getLogger("postoffice.auth")

# RFC 9106 §4 second recommended option (t=3, 64 MiB) with one lane: the
# same memory and time cost as argon2-cffi's default (p=4 there), and a form
# libsodium verifies (it supports p=1 only).
DEFAULT_TIME_COST, DEFAULT_MEMORY_KIB, DEFAULT_LANES = 3, 65536, 1

# A hash of a random password: verified against when the user does not exist,
# so that "no such user" costs as long as "wrong password" (no user probing).
_DUMMY_PASSWORD = "postoffice-no-such-user"


class PasswordHasher:
    """argon2id, t=3, 64 MiB, one lane by default (``DEFAULT_*``)."""

    def __init__(self, hasher: argon2.PasswordHasher | None = None) -> None:
        self._hasher = hasher or argon2.PasswordHasher(
            time_cost=DEFAULT_TIME_COST, memory_cost=DEFAULT_MEMORY_KIB, parallelism=DEFAULT_LANES
        )
        self._dummy: str | None = None  # made on first use: hashing is slow by design

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """Blocking check; ``stored_hash`` None (no such user) still costs a verify
        (of a hash with the default parameters, so it takes as long as a real one)."""
        if stored_hash is None and self._dummy is None:
            self._dummy = self._hasher.hash(_DUMMY_PASSWORD)
        target = stored_hash or self._dummy or ""
        if _sodium_argon2id is not None and _one_lane_argon2id(target):
            try:
                _sodium_argon2id.verify(target.encode("ascii"), password.encode("utf-8"))
            except _NaclMismatch:  # a wrong password, or a hash libsodium refuses
                return False
            except (ValueError, UnicodeError):
                pass  # not for libsodium after all: let argon2-cffi judge it
            else:
                return stored_hash is not None
        try:
            self._hasher.verify(target, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored_hash is not None


def _one_lane_argon2id(encoded: str) -> bool:
    """``$argon2id$v=19$m=...,t=...,p=1$salt$hash``: what libsodium can verify."""
    parts = encoded.split("$")
    return (
        len(parts) == 6
        and parts[1] == "argon2id"
        and parts[2] == "v=19"
        and parts[3].split(",")[-1:] == ["p=1"]
    )


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    turn: float = 0.0  # when the latest throttled attempt from this key is judged


class LoginThrottle:
    """Delays logins after repeated failures, per client address and per account.

    After ``free_failures`` failures, each further attempt waits
    ``2 ** (extra failures)`` seconds, capped at ``max_delay``.  Failures are
    forgotten ``forget_after`` seconds after the last one, and a success
    clears the account's (not the address's) record, so a brute-forcer on
    one address cannot lock the real owner out for longer than the cap.

    Throttled attempts from one client address take turns: each is judged
    at least the delay after the previous one, so opening many connections
    and guessing on all at once gains nothing.  Accounts do not queue like
    this, so guesses from elsewhere never push the owner's login back
    further than the cap.
    """

    def __init__(
        self,
        free_failures: int = 3,
        max_delay: float = 30.0,
        forget_after: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self.free_failures = free_failures
        self.max_delay = max_delay
        self.forget_after = forget_after
        self._clock = clock
        self._max_entries = max_entries
        self._by_key: dict[str, _Failures] = {}

    def _entry(self, key: str) -> _Failures | None:
        entry = self._by_key.get(key)
        if entry and self._clock() - entry.last > self.forget_after:
            del self._by_key[key]
            return None
        return entry

    def delay(self, client_ip: str, account: str | None) -> float:
        """Seconds to wait before judging this attempt (and take its turn)."""
        worst = 0
        for key in (f"ip:{client_ip}", f"acct:{account}" if account else None):
            if key and (entry := self._entry(key)):
                worst = max(worst, entry.count)
        extra = worst - self.free_failures
        if extra < 0:
            return 0.0
        wait = min(self.max_delay, float(2 ** min(extra, 16)))
        by_ip = self._entry(f"ip:{client_ip}")
        if by_ip is None or by_ip.count < self.free_failures:
            return wait
        now = self._clock()
        by_ip.turn = max(now, by_ip.turn) + wait
        return by_ip.turn - now

    def failed(self, client_ip: str, account: str | None) -> None:
        now = self._clock()
        if len(self._by_key) >= self._max_entries:
            self._prune(now)
        for key in (f"ip:{client_ip}", f"acct:{account}" if account else None):
            if key:
                entry = self._entry(key) or self._by_key.setdefault(key, _Failures())
                self._by_key[key] = entry
                entry.count += 1
                entry.last = now

    def succeeded(self, client_ip: str, account: str) -> None:
        self._by_key.pop(f"acct:{account}", None)

    def _prune(self, now: float) -> None:
        stale = [k for k, e in self._by_key.items() if now - e.last > self.forget_after]
        for k in stale:
            del self._by_key[k]
        if len(self._by_key) >= self._max_entries:  # still full: drop the oldest half
            for k, _ in sorted(self._by_key.items(), key=lambda kv: kv[1].last)[
                : self._max_entries // 2
            ]:
                del self._by_key[k]


class Authenticator:
    """Checks a user's password against the account store, throttled and logged.

    Shared by SMTP AUTH and POP3; protocol code calls ``authenticate`` and
    gets the account's Address or None.
    """

    def __init__(
        self,
        lookup_hash: Callable[[Address], str | None],
        hasher: PasswordHasher,
        throttle: LoginThrottle,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._lookup_hash = lookup_hash
        self._hasher = hasher
        self._throttle = throttle
        self._executor = executor
        self._slots: asyncio.Semaphore | None = None  # made in the running loop

    async def authenticate(
        self, address: Address | None, password: str, client_ip: str, protocol: str
    ) -> Address | None:
        """``address`` None means the name did not even parse: it still costs a verify."""
        account = str(address) if address else None
        wait = self._throttle.delay(client_ip, account)
        if wait:
            await asyncio.sleep(wait)
        stored = self._lookup_hash(address) if address else None
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, os.cpu_count() or 1))
        async with self._slots:
            ok = await loop.run_in_executor(self._executor, self._hasher.verify, stored, password)
        if ok and address is not None:
            self._throttle.succeeded(client_ip, str(address))
            log.info(
                "auth ok protocol=%s client=%s user=%s", protocol, client_ip, logfmt.field(address)
            )
            return address
        self._throttle.failed(client_ip, account)
        log.warning(
            "auth failed protocol=%s client=%s user=%s",
            protocol,
            client_ip,
            logfmt.field(account or "-"),
        )
        return None
