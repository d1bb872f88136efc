"""Mailbox quotas over real sockets: smtplib, raw SMTP, poplib and the CLI.

``[limits] mailbox_quota`` and ``postoffice user quota``: a full mailbox is
452 4.2.2 at RCPT (as is a declared SIZE= that does not fit), a message that
would take it past its quota 552 5.2.2 after the data when it is the
message's only destination, else 452 4.2.2 (never a 5xx for the others),
and a full alias member is skipped.  Usage lives in the
Maildir++ ``maildirsize`` file, kept in step by deliveries and POP3
deletions, and recounted when the Maildir was changed behind the server's
back, and after a restart.
"""

from __future__ import annotations

import os
import poplib
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
BOB = "bob@example.test"
QUOTA = 30_000
TICK = 0.05  # longer than a file-system timestamp tick (a jiffy: 1-10 ms)


def message(tag: str, size: int) -> bytes:
    line = b"q" * 78 + b"\r\n"
    return f"Subject: {tag}\r\n\r\n".encode() + line * (size // len(line))


def stored_bytes(srv: PostofficeServer, address: str) -> int:
    return sum(p.stat().st_size for p in srv.messages(address))


def recorded(srv: PostofficeServer, address: str) -> tuple[str, int, int]:
    """maildirsize: its limit line and the sums of its change lines."""
    first, *changes = (srv.maildir(address) / "maildirsize").read_text().splitlines()
    return (
        first,
        sum(int(line.split()[0]) for line in changes),
        sum(int(line.split()[1]) for line in changes),
    )


def send(srv: PostofficeServer, rcpt: str, tag: str, size: int) -> None:
    """smtplib, which declares SIZE= (RFC 1870) as the server offers it."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as s:
        s.sendmail("sender@remote.test", [rcpt], message(tag, size))


def send_raw(srv: PostofficeServer, rcpt: str, tag: str, size: int) -> tuple[int, list[str]]:
    """No SIZE=: the server learns the size only from the data."""
    c = RawSmtp("127.0.0.1", srv.ports["smtp"], timeout=15)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
    if code != 250:
        return code, lines
    assert c.cmd("DATA")[0] == 354
    c.send(message(tag, size) + b".\r\n")
    answer = c.reply()
    c.cmd("QUIT")
    return answer


def pop3(srv: PostofficeServer) -> tuple[poplib.POP3_SSL, bytes]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], timeout=15, context=ctx)
    pop.user(ALICE)
    return pop, pop.pass_(ALICE_PW)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path, sections={"limits": {"mailbox_quota": QUOTA}})
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, "bob-password-2")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_message_that_would_cross_the_quota(srv: PostofficeServer) -> None:
    send(srv, ALICE, "m1", 10_000)
    send(srv, ALICE, "m2", 10_000)
    assert 20_000 < stored_bytes(srv, ALICE) < QUOTA - 8_000
    # Without SIZE= the server sees the size only at the end: 552 5.2.2, nothing stored.
    code, lines = send_raw(srv, ALICE, "m3", 10_000)
    assert (code, lines[0][:5]) == (552, "5.2.2"), lines
    # With SIZE= (smtplib) it is known at RCPT: 452 4.2.2, the data is never sent.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(srv, ALICE, "m3", 10_000)
    code, text = refused.value.recipients[ALICE]
    assert (code, text[:5]) == (452, b"4.2.2"), text
    assert len(srv.messages(ALICE)) == 2
    send(srv, BOB, "m3", 10_000)  # another mailbox, its own quota
    send(srv, ALICE, "small", 3_000)  # what still fits is accepted
    assert len(srv.messages(ALICE)) == 3
    # Every delivery was recorded in Maildir++'s maildirsize as it happened.
    assert recorded(srv, ALICE) == (f"{QUOTA}S", stored_bytes(srv, ALICE), 3)
    assert "Traceback" not in srv.log()


def test_cli_quota_and_a_full_mailbox_at_rcpt(srv: PostofficeServer) -> None:
    send(srv, ALICE, "m1", 10_000)
    send(srv, ALICE, "m2", 10_000)
    used = stored_bytes(srv, ALICE)
    shown = srv.cli("user", "quota", ALICE).stdout
    assert f"{ALICE}: {used} bytes in 2 messages; quota {QUOTA} bytes" in shown
    assert "the default" in shown
    # Below what alice holds: her mailbox is full now.
    out = srv.cli("user", "quota", ALICE, "15K").stdout
    assert f"set the quota of {ALICE}: 15 KiB" in out and "100% used, FULL" in out
    code, lines = send_raw(srv, ALICE, "m3", 100)
    assert (code, lines[0][:5]) == (452, "4.2.2"), lines
    listing = srv.cli("user", "list", "--quota").stdout.splitlines()
    assert any(line.startswith(f"{ALICE}: {used} bytes") and "its own" in line for line in listing)
    assert any(line.startswith(f"{BOB}: 0 bytes") and "the default" in line for line in listing)
    # "none" lifts it for alice alone; "default" puts the config's back.
    assert "no quota (its own)" in srv.cli("user", "quota", ALICE, "none").stdout
    assert send_raw(srv, ALICE, "m3", 20_000)[0] == 250
    assert "FULL" in srv.cli("user", "quota", ALICE, "default").stdout
    assert send_raw(srv, ALICE, "m4", 100)[0] == 452
    for bad in ("lots", "-5", "1.5.2G"):
        result = srv.cli("user", "quota", ALICE, bad, check=False)
        assert result.returncode == 1 and "not a size" in result.stderr, result
    result = srv.cli("user", "quota", "nobody@example.test", "1G", check=False)
    assert result.returncode == 1 and "no such user" in result.stderr


def test_pop3_shows_usage_and_deletions_make_room(srv: PostofficeServer) -> None:
    send(srv, ALICE, "m1", 10_000)
    send(srv, ALICE, "m2", 10_000)
    srv.cli("user", "quota", ALICE, "20000")
    pop, welcome = pop3(srv)
    used = stored_bytes(srv, ALICE)
    assert f"quota {used} of 20000 octets used (100%), mailbox full".encode() in welcome, welcome
    assert pop.stat()[0] == 2  # STAT keeps RFC 1939's exact form
    pop.dele(1)
    pop.quit()
    first, total, count = recorded(srv, ALICE)
    assert (first, total, count) == ("20000S", stored_bytes(srv, ALICE), 1)
    assert total < used  # the deletion was recorded, not recounted
    send(srv, ALICE, "m3", 5_000)
    _pop, welcome = pop3(srv)
    assert b"mailbox full" not in welcome and b"octets used (" in welcome
    _pop.quit()


def test_changes_behind_the_servers_back_are_recounted(srv: PostofficeServer) -> None:
    send(srv, ALICE, "m1", 10_000)
    send(srv, ALICE, "m2", 10_000)
    new = srv.maildir(ALICE) / "new"
    # Another program drops a 15 KB message in, without a maildirsize line.
    # (Later than the server's last line by a clock tick at least: a change
    # within the same tick is seen only by the next full recount.)
    time.sleep(TICK)
    (new / "1700000000.M1P1.elsewhere").write_bytes(message("outside", 15_000))
    code, lines = send_raw(srv, ALICE, "m3", 1_000)
    assert (code, lines[0][:5]) == (552, "5.2.2"), lines  # counted, not trusted blindly
    code, lines = send_raw(srv, ALICE, "m3", 100)
    assert (code, lines[0][:5]) == (452, "4.2.2"), lines
    # Someone deletes mail by hand: the next message is judged on a recount.
    time.sleep(TICK)
    for path in list(new.iterdir()):
        path.unlink()
    assert send_raw(srv, ALICE, "m4", 10_000)[0] == 250
    assert recorded(srv, ALICE)[1:] == (stored_bytes(srv, ALICE), 1)


def test_a_restart_recounts_what_it_cannot_know(srv: PostofficeServer) -> None:
    send(srv, ALICE, "m1", 10_000)
    send(srv, ALICE, "m2", 10_000)
    srv.kill()
    # Whatever maildirsize says after a crash (here: empty, and newer than
    # the Maildir), the first delivery after the start counts again.
    size_file = srv.maildir(ALICE) / "maildirsize"
    size_file.write_text(f"{QUOTA}S\n0 0\n")
    os.utime(size_file)
    srv.start()
    code, lines = send_raw(srv, ALICE, "m3", 10_000)
    assert (code, lines[0][:5]) == (552, "5.2.2"), lines
    assert recorded(srv, ALICE)[1:] == (stored_bytes(srv, ALICE), 2)


def transaction(srv: PostofficeServer, rcpts: list[str], tag: str, size: int) -> list[int]:
    """Raw SMTP, no SIZE=: each RCPT's code, then DATA's final code (if any
    recipient was taken)."""
    c = RawSmtp("127.0.0.1", srv.ports["smtp"], timeout=15)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    codes = [c.cmd(f"RCPT TO:<{rcpt}>")[0] for rcpt in rcpts]
    if 250 in codes:
        assert c.cmd("DATA")[0] == 354
        c.send(message(tag, size) + b".\r\n")
        code, lines = c.reply()
        codes.append(code)
        if code != 250:
            assert lines[0].startswith("4.2.2"), lines  # never a 5xx for the others
    c.cmd("QUIT")
    return codes


def fill_alice(srv: PostofficeServer) -> None:
    send(srv, ALICE, "m1", 10_000)
    send(srv, ALICE, "m2", 10_000)  # ~20 KiB of 30: room for small mail only


def test_one_full_mailbox_never_bounces_the_others(srv: PostofficeServer) -> None:
    """review #3: alice has no room for the message, bob has.  One reply
    covers the message, so it is deferred (452 4.2.2), not refused; the
    retry is refused for alice alone at RCPT (the size is remembered, though
    no SIZE= is declared) and bob gets his copy."""
    fill_alice(srv)
    assert transaction(srv, [ALICE, BOB], "multi", 10_000) == [250, 250, 452]
    assert srv.messages(BOB) == []
    assert "smtp quota defer" in srv.log()
    assert transaction(srv, [ALICE, BOB], "multi", 10_000) == [452, 250, 250]
    assert len(srv.messages(BOB)) == 1 and len(srv.messages(ALICE)) == 2
    # The client sends alice's copy alone later: refused at RCPT while it
    # cannot fit.  Mail that declares a SIZE= that fits still reaches her.
    assert transaction(srv, [ALICE], "multi", 10_000) == [452]
    send(srv, ALICE, "small", 3_000)
    assert len(srv.messages(ALICE)) == 3


def test_a_full_alias_member_is_skipped_and_the_rest_delivered(srv: PostofficeServer) -> None:
    srv.cli("alias", "add", "team@example.test", ALICE, BOB)
    srv.cli("alias", "add", "solo@example.test", ALICE)
    send(srv, ALICE, "m1", 16_000)
    srv.cli("user", "quota", ALICE, "15K")  # over it now
    assert transaction(srv, ["team@example.test"], "team", 1_000) == [250, 250]
    assert len(srv.messages(BOB)) == 1 and len(srv.messages(ALICE)) == 1
    assert "smtp quota skip client=127.0.0.1 alias=<team@example.test>" in srv.log()
    # An alias whose every member is full is a full mailbox.
    assert transaction(srv, ["solo@example.test"], "solo", 1_000) == [452]


def test_an_alias_member_without_room_for_this_message(srv: PostofficeServer) -> None:
    """Found out only after the data: deferred, then skipped at RCPT."""
    srv.cli("alias", "add", "team@example.test", ALICE, BOB)
    fill_alice(srv)
    assert transaction(srv, ["team@example.test"], "team", 10_000) == [250, 452]
    assert transaction(srv, ["team@example.test"], "team", 10_000) == [250, 250]
    assert len(srv.messages(BOB)) == 1 and len(srv.messages(ALICE)) == 2
