"""The command counts of an SMTP session's last log record (net/smtp_tally.py)."""

from __future__ import annotations

from postoffice.net.smtp_tally import CommandTally


def test_counts_read_like_postfix() -> None:
    tally = CommandTally()
    assert tally.summary() == "commands=0"
    for verb in ("ehlo", "mail", "rcpt", "rcpt", "data", "quit"):
        tally.given(verb)
    for verb in ("ehlo", "mail", "rcpt", "quit"):
        tally.succeeded(verb)
    assert tally.summary() == "ehlo=1 mail=1 rcpt=1/2 data=0/1 quit=1 commands=4/6"


def test_unknown_verbs_share_one_counter_in_a_fixed_order() -> None:
    tally = CommandTally()
    for verb in ("xyzzy", "quit", "", "starttls", "helo"):
        tally.given(verb)
    tally.succeeded("helo")
    tally.succeeded("starttls")
    assert tally.summary() == "helo=1 starttls=1 quit=0/1 unknown=0/2 commands=2/5"
