"""policy/recent_logins.py: newest first, bounded per account and in all."""

from __future__ import annotations

from postoffice.policy.recent_logins import RecentLogins


def test_newest_first_per_account_any_case() -> None:
    now = [0.0]
    recent = RecentLogins(lambda: now[0], per_account=3)
    for n, protocol in enumerate(["pop3", "imap", "smtp", "web"]):
        now[0] = float(n)
        recent.record("Alice@example.test", protocol, f"192.0.2.{n}")
    shown = recent.of("alice@example.test")
    assert [(x.protocol, x.client, x.time) for x in shown] == [
        ("web", "192.0.2.3", 3.0),
        ("smtp", "192.0.2.2", 2.0),
        ("imap", "192.0.2.1", 1.0),
    ]
    assert recent.of("bob@example.test") == []


def test_the_least_recently_active_account_is_forgotten_first() -> None:
    recent = RecentLogins(max_accounts=2)
    recent.record("a@x.test", "pop3", "192.0.2.1")
    recent.record("b@x.test", "pop3", "192.0.2.1")
    recent.record("a@x.test", "imap", "192.0.2.1")  # a is active again
    recent.record("c@x.test", "pop3", "192.0.2.1")
    assert recent.of("b@x.test") == []
    assert len(recent.of("a@x.test")) == 2 and len(recent.of("c@x.test")) == 1
