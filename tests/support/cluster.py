"""Helpers for the [cluster] tests: POP3 logins against a node, timed."""

from __future__ import annotations

import poplib
import time
from collections.abc import Callable

from tests.support.server import PostofficeServer

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
PROPAGATION = 1.0  # issue 17: a change on one node is in force on all within 1 s


def pop3_login(node: PostofficeServer, user: str, password: str) -> bool:
    client = poplib.POP3("127.0.0.1", node.ports["pop3"], timeout=15)
    try:
        client.user(user)
        client.pass_(password)
        return True
    except poplib.error_proto:
        return False
    finally:
        client.quit() if client.sock else None


def first_success(attempt: Callable[[], bool], seconds: float) -> float | None:
    """Seconds from now until an attempt that started then succeeded; None if
    none did within ``seconds``.  Bounded: at most 50 attempts."""
    start = time.monotonic()
    for _ in range(50):
        began = time.monotonic() - start
        if began > seconds:
            return None
        if attempt():
            return began
        time.sleep(0.05)
    return None
