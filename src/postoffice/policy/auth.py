"""Password hashing, and checking logins off the event loop, throttled.

Passwords are stored only as argon2id hashes (argon2-cffi).  Verification
costs tens of milliseconds of CPU by design, so it runs in a pool of its own
(``HashingPool``; the C code releases the GIL) and never stalls other
sessions or takes the shared I/O pool's threads.  Who may have a password
checked, and when, is policy/throttle.py's decision.  Hashes with one lane
(``p=1``, our default, and Dovecot's) are verified by libsodium (PyNaCl)
where installed: its vectorised argon2 needs about half the CPU of
argon2-cffi's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from postoffice import logfmt, metrics
from postoffice.mail.address import Address, AddressError, parse_mailbox
from postoffice.policy import app_passwords
from postoffice.policy.recent_logins import RecentLogins
from postoffice.policy.throttle import LoginThrottle

try:
    from nacl.exceptions import InvalidkeyError as _NaclMismatch
    from nacl.pwhash import argon2id as _sodium_argon2id
except ImportError:  # pragma: no cover - PyNaCl is a dependency; still optional here
    _sodium_argon2id = None  # type: ignore[assignment]

log = logging.getLogger("postoffice.auth")

T = TypeVar("T")

# RFC 9106 §4 second recommended option (t=3, 64 MiB) with one lane: the
# same memory and time cost as argon2-cffi's default (p=4 there), and a form
# libsodium verifies (it supports p=1 only).
DEFAULT_TIME_COST, DEFAULT_MEMORY_KIB, DEFAULT_LANES = 3, 65536, 1

# The web pages' logins (web/): the account password only, no app password.
WEB_PROTOCOL = "web"

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


# Checks that may wait for a hashing thread, per thread, beyond the known-good
# lane: 32 x ~50 ms is under two seconds of queue.
HASH_WAITING_PER_WORKER = 32


class HashQueueFull(Exception):
    """Too many password checks wait already: answer "try later"."""


class HashingPool:
    """Threads that check passwords, apart from the shared I/O pool.

    A flood of logins must not starve queue commits, POP3 reads and DKIM
    checks, which share ``Services.executor``; so hashing has its own
    ``workers`` threads (each check takes tens of milliseconds of CPU and
    64 MiB, so more threads than CPUs buy nothing).  At most ``workers``
    checks are handed to the threads at once; the rest wait here in two
    lanes, known-good (address, account) pairs first, so the owner is not
    queued behind a flood.  At most ``max_waiting`` others wait: beyond
    that an attempt is refused at once (``HashQueueFull``) rather than held.
    """

    def __init__(self, workers: int, max_waiting: int) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="postoffice-hash")
        self._free = workers
        self._lanes: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),  # known-good pairs
            deque(),  # everyone else
        )

    async def run(self, fn: Callable[..., T], *args: Any, priority: bool = False) -> T:
        loop = asyncio.get_running_loop()
        if self._free > 0:
            self._free -= 1
        else:
            lane = self._lanes[0 if priority else 1]
            if not priority and len(lane) >= self.max_waiting:
                raise HashQueueFull
            turn: asyncio.Future[None] = loop.create_future()
            lane.append(turn)
            try:
                await turn  # a finishing check hands its thread over
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # handed over just as we were cancelled: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        lane.remove(turn)
                raise
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._release()

    def _release(self) -> None:
        for lane in self._lanes:
            while lane:
                turn = lane.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._free += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def default_hash_workers() -> int:
    """One thread fewer than the CPUs this process may use (at least one), so
    a login flood leaves a CPU for the event loop and file I/O."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


class LoginThrottled(Exception):
    """The password was not checked: a throttle budget is spent.  Answer
    "try later" (SMTP 454 4.7.0, RFC 4954 §6; POP3 -ERR [SYS/TEMP], RFC 3206 §4),
    never "wrong password": the password may well be right."""


class Authenticator:
    """Checks a user's password against the account store, throttled and logged.

    Shared by SMTP AUTH and POP3; protocol code calls ``authenticate`` and
    gets the account's Address, None (wrong), or ``LoginThrottled``.
    """

    def __init__(
        self,
        lookup_hash: Callable[[Address], str | None],
        hasher: PasswordHasher,
        throttle: LoginThrottle,
        pool: HashingPool,
        lookup_app_digests: Callable[[Address], Collection[str]] | None = None,
    ) -> None:
        self._lookup_hash = lookup_hash
        # The user's app passwords' digests (policy/app_passwords.py): any
        # of them logs in too, checked in microseconds, before the argon2 run.
        self._lookup_app_digests = lookup_app_digests
        self._hasher = hasher
        self._throttle = throttle
        self._pool = pool
        self._tag_key = os.urandom(32)  # never leaves this process
        # Each account's last logins, for its owner's /account page.
        self.recent = RecentLogins()

    async def login(
        self, name: str, password: str, client_ip: str, protocol: str
    ) -> Address | None:
        """The account ``name`` (as a client typed it: parsed the way the
        account store looks users up) if ``password`` is right; every
        protocol's login goes through here.  A name that does not parse
        still costs a verify: no probing for names."""
        try:
            address: Address | None = parse_mailbox(name)
        except AddressError:
            address = None
        return await self.authenticate(address, password, client_ip, protocol)

    async def authenticate(
        self, address: Address | None, password: str, client_ip: str, protocol: str
    ) -> Address | None:
        """``address`` None means the name did not even parse: it still costs a verify."""
        account = str(address) if address else ""
        stored = self._lookup_hash(address) if address else None
        admission = self._throttle.admit(client_ip, account, self._tag(stored, password))
        who = f"protocol={protocol} client={client_ip} user={logfmt.field(account or '-')}"
        if admission.repeat:
            log.warning("auth failed %s (the same wrong password again)", who)
            metrics.auth(protocol, "failure")
            return None
        if admission.refused_by:
            log.debug("auth throttled %s by=%s", who, admission.refused_by)
            metrics.auth(protocol, "throttled")
            raise LoginThrottled(admission.refused_by)
        checking = False
        try:
            if admission.wait:
                await asyncio.sleep(admission.wait)
            checking = True
            ok = self._app_password(address, stored, password, protocol) or await self._pool.run(
                self._hasher.verify, stored, password, priority=admission.known_good
            )
        except HashQueueFull:
            self._throttle.abandoned(admission)
            log.debug("auth throttled %s by=hashing-queue", who)
            metrics.auth(protocol, "throttled")
            raise LoginThrottled("hashing queue") from None
        except BaseException:  # cancelled (shutdown): a check under way counts
            if checking:
                self._throttle.failed(admission)
            else:
                self._throttle.abandoned(admission)
            raise
        if ok and address is not None:
            self._throttle.succeeded(admission)
            self.recent.record(account, protocol, client_ip)
            log.info("auth ok %s", who)
            metrics.auth(protocol, "success")
            return address
        self._throttle.failed(admission)
        log.warning("auth failed %s", who)
        metrics.auth(protocol, "failure")
        if admission.fail_delay:
            await asyncio.sleep(admission.fail_delay)
        return None

    def _app_password(
        self, address: Address | None, stored: str | None, password: str, protocol: str
    ) -> bool:
        """``password`` is one of the (existing) user's app passwords, and
        ``protocol`` one that takes them: the mail protocols, never the web
        pages, where an app password would let a stolen phone change the
        account's password or make itself more app passwords."""
        if protocol == WEB_PROTOCOL:
            return False
        if address is None or stored is None or self._lookup_app_digests is None:
            return False
        wanted = app_passwords.digest(password)
        if wanted is None:
            return False
        return any(hmac.compare_digest(wanted, d) for d in self._lookup_app_digests(address))

    async def hash_password(self, password: str) -> str:
        """A new password's hash (the web pages' password change), made in the
        hashing pool like a check: it costs as much, and must not stall the loop."""
        return await self._pool.run(self._hasher.hash, password)

    def close(self) -> None:
        self._pool.shutdown()

    def _tag(self, stored: str | None, password: str) -> bytes:
        """32 bits naming (stored hash, password): a repeat is recognised, the
        password cannot be recovered (the key is random per process, and 32
        bits match billions of passwords)."""
        data = (stored or "").encode() + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._tag_key, data, hashlib.sha256).digest()[:4]
