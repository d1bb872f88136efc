"""The POP3 maildrop on real Maildirs: snapshot, UIDs, sizes, lock, reads, UPDATE."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postoffice.protocol.pop3 import MessageEncoder, retr_wire_form, wire_size
from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.pop3_mailbox import (
    AHEAD_BYTES,
    AHEAD_COUNT,
    LOCK_NAME,
    READ_CHUNK,
    SIZES_NAME,
    MailboxBusy,
    MailboxLock,
    MessageGone,
    Pop3Mailbox,
    ReadAhead,
    scan,
)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    path = tmp_path / "example.test" / "alice"
    ensure_maildir(path)
    return path


def put(maildir: Path, name: str, data: bytes, sub: str = "new") -> Path:
    path = maildir / sub / name
    path.write_bytes(data)
    return path


def dovecot_name(base: str, data: bytes) -> str:
    crlf = len(data) + data.count(b"\n")
    return f"{base},S={len(data)},W={crlf}"


def retr_bytes(box: Pop3Mailbox, number: int) -> bytes:
    msg = box.get(number)
    assert msg is not None
    first, fh = box.read_first(msg)
    encoder = MessageEncoder()
    out = encoder.feed(first)
    while fh is not None:
        chunk = box.read_next(fh)
        if not chunk:
            break
        out += encoder.feed(chunk)
    return out + encoder.finish()


def unstuffed_size(wire: bytes) -> int:
    body = wire[: -len(b".\r\n")]
    return len(body) - sum(1 for line in body.split(b"\r\n") if line.startswith(b"."))


# --- snapshot and sizes -------------------------------------------------------------


def test_sizes_from_w_field_and_computed_agree_with_what_retr_sends(maildir: Path) -> None:
    a = b"Subject: a\n\n.dot\nbody\n"
    b = b"Subject: b\r\n\r\ncrlf body\r\n"
    c = b"Subject: c\n\nno final newline"
    put(maildir, dovecot_name("1700000000.M1P1.host", a), a)
    put(maildir, "1700000001.other-agent", b)
    put(maildir, "1700000002.no-newline", c, sub="cur")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        assert [m.size for m in box.messages] == [len(a) + 4, len(b), len(c) + 2 + 2]
        for number, msg in box.live():
            assert unstuffed_size(retr_bytes(box, number)) == msg.size
        assert box.stat() == (3, sum(m.size for m in box.messages))
    finally:
        box.close()


def test_computed_sizes_are_cached_and_invalidated_by_a_size_change(maildir: Path) -> None:
    path = put(maildir, "1700000000.plain", b"a\nb\n")
    assert [m.size for m in scan(maildir, wire_size)] == [6]
    cache = (maildir / SIZES_NAME).read_text()
    assert cache == "1700000000.plain\t4\t6\n"
    # Same length, different content: the cache (keyed by file size) answers,
    # which proves the second login did not read the file.
    path.write_bytes(b"abc\n")
    assert [m.size for m in scan(maildir, wire_size)] == [6]
    path.write_bytes(b"a\nb\nc\n")
    assert [m.size for m in scan(maildir, wire_size)] == [9]
    path.unlink()
    assert scan(maildir, wire_size) == []
    assert (maildir / SIZES_NAME).read_text() == ""  # gone messages are pruned


def test_a_cached_size_of_an_s_named_message_needs_no_stat(maildir: Path) -> None:
    # S= is the file size (Maildir files are never rewritten): with a cached
    # entry for it, the login takes the size without looking at the file.
    path = put(maildir, "1700000000.plain,S=4", b"a\nb\n")
    assert [m.size for m in scan(maildir, wire_size)] == [6]
    assert (maildir / SIZES_NAME).read_text() == "1700000000.plain,S=4\t4\t6\n"
    path.write_bytes(b"a\nb\nc\n")  # a different length: only a stat could tell
    assert [m.size for m in scan(maildir, wire_size)] == [6]


def test_an_s_named_message_whose_s_is_wrong_is_measured(maildir: Path) -> None:
    put(maildir, "1700000000.plain,S=99", b"a\nb\n")
    assert [m.size for m in scan(maildir, wire_size)] == [6]
    assert [m.size for m in scan(maildir, wire_size)] == [6]  # cached by the real file size


def test_w_sized_messages_need_no_cache(maildir: Path) -> None:
    data = b"x\n"
    put(maildir, dovecot_name("1700000000.a", data), data)
    scan(maildir, wire_size)
    assert not (maildir / SIZES_NAME).exists()


def test_a_corrupt_cache_is_ignored(maildir: Path) -> None:
    put(maildir, "1700000000.plain", b"a\nb\n")
    (maildir / SIZES_NAME).write_text("garbage\n1700000000.plain\tx\t1\n")
    assert [m.size for m in scan(maildir, wire_size)] == [6]


def test_order_is_delivery_time_then_name(maildir: Path) -> None:
    for name in ("1000.b", "999.z", "1000.a", "zzz-no-time"):
        put(maildir, name, b"x\n")
    put(maildir, "998.in-cur:2,S", b"x\n", sub="cur")
    assert [m.name for m in scan(maildir, wire_size)] == [
        "zzz-no-time",
        "998.in-cur:2,S",
        "999.z",
        "1000.a",
        "1000.b",
    ]


def test_hidden_files_and_directories_are_not_messages(maildir: Path) -> None:
    put(maildir, ".hidden", b"x\n")
    (maildir / "new" / "1700000000.dir").mkdir()
    put(maildir, "1700000001.real", b"x\n")
    assert [m.name for m in scan(maildir, wire_size)] == ["1700000001.real"]


def test_snapshot_does_not_see_later_deliveries(maildir: Path) -> None:
    put(maildir, "1700000000.first", b"x\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        put(maildir, "1700000001.later", b"y\n")
        assert [m.name for m in box.messages] == ["1700000000.first"]
        assert box.get(2) is None
    finally:
        box.close()


# --- UIDs ---------------------------------------------------------------------------


def test_uid_is_the_base_name_and_survives_moves_and_flags(maildir: Path) -> None:
    data = b"x\n"
    name = dovecot_name("1700000000.M5P7.host", data)
    put(maildir, name, data)
    assert [m.uid for m in scan(maildir, wire_size)] == ["1700000000.M5P7.host"]
    os.rename(maildir / "new" / name, maildir / "cur" / (name + ":2,FS"))
    assert [m.uid for m in scan(maildir, wire_size)] == ["1700000000.M5P7.host"]


def test_uids_outside_the_rfc_alphabet_or_length_are_hashed_stably(maildir: Path) -> None:
    long_base = "1700000000." + "x" * 80
    put(maildir, long_base, b"x\n")
    put(maildir, "1700000001.caf\u00e9", b"x\n")
    put(maildir, "1700000002.with space", b"x\n")
    uids = [m.uid for m in scan(maildir, wire_size)]
    for uid in uids:
        assert 1 <= len(uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uid)
    assert len(set(uids)) == 3
    assert [m.uid for m in scan(maildir, wire_size)] == uids


def test_duplicate_base_names_still_get_unique_uids(maildir: Path) -> None:
    put(maildir, "1700000000.same,S=2", b"x\n")
    put(maildir, "1700000000.same,S=2,X=other", b"y\n", sub="cur")
    uids = [m.uid for m in scan(maildir, wire_size)]
    assert len(uids) == 2 and len(set(uids)) == 2
    assert "1700000000.same" in uids


def test_a_message_seen_in_new_and_cur_while_moving_is_listed_once(maildir: Path) -> None:
    put(maildir, "1700000000.moving", b"x\n")
    put(maildir, "1700000000.moving:2,S", b"x\n", sub="cur")
    assert len(scan(maildir, wire_size)) == 1


# --- the lock (RFC 1939 §8) -----------------------------------------------------------


def test_two_sessions_in_one_process_exclude_each_other(maildir: Path) -> None:
    box = Pop3Mailbox.open(maildir, wire_size)
    with pytest.raises(MailboxBusy):
        Pop3Mailbox.open(maildir, wire_size)
    box.close()
    assert not box.locked
    box.close()  # idempotent
    Pop3Mailbox.open(maildir, wire_size).close()


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_blocks_and_dies_with_it(maildir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(maildir / LOCK_NAME)], stdout=subprocess.PIPE
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"locked\n"
            with pytest.raises(MailboxBusy):
                MailboxLock.acquire(maildir)
            os.kill(holder.pid, signal.SIGKILL)  # a crash: the kernel drops its lock
            holder.wait(10)
            deadline = time.monotonic() + 10
            while True:
                try:
                    MailboxLock.acquire(maildir).release()
                    break
                except MailboxBusy:
                    assert time.monotonic() < deadline, "lock survived its holder"
                    time.sleep(0.05)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)


# --- reading --------------------------------------------------------------------------


def test_a_large_message_streams_in_chunks(maildir: Path) -> None:
    line = b"." + b"y" * 98 + b"\n"
    data = line * (3 * READ_CHUNK // len(line) + 7)
    put(maildir, "1700000000.big", data)
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        msg = box.get(1)
        assert msg is not None
        first, fh = box.read_first(msg)
        assert len(first) == READ_CHUNK and fh is not None
        fh.close()
        wire = retr_bytes(box, 1)
        assert unstuffed_size(wire) == msg.size == wire_size([data])
        assert wire.startswith(b"..yyy")
        assert wire.count(b"\r\n..yyy") == data.count(b"\n") - 1
    finally:
        box.close()


def test_a_message_renamed_by_another_reader_is_followed(maildir: Path) -> None:
    put(maildir, "1700000000.x", b"hello\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        os.rename(maildir / "new" / "1700000000.x", maildir / "cur" / "1700000000.x:2,S")
        assert retr_bytes(box, 1) == b"hello\r\n.\r\n"
        assert box.messages[0].subdir == "cur"
    finally:
        box.close()


def test_read_small_reads_whole_messages_follows_renames_and_skips_the_gone(
    maildir: Path,
) -> None:
    put(maildir, "1700000000.a", b"one\n")
    put(maildir, "1700000001.b", b"two\n")
    put(maildir, "1700000002.c", b"three\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        os.rename(maildir / "new" / "1700000000.a", maildir / "cur" / "1700000000.a:2,S")
        (maildir / "new" / "1700000001.b").unlink()
        assert [box.read_small(m) for m in box.messages] == [b"one\n", None, b"three\n"]
        assert box.messages[0].subdir == "cur"
    finally:
        box.close()


def test_read_small_refuses_a_file_longer_than_its_size(maildir: Path) -> None:
    path = put(maildir, "1700000000.a", b"x\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        path.write_bytes(b"x" * 100)  # grew since the snapshot
        assert [box.read_small(m) for m in box.messages] == [None]
    finally:
        box.close()


def test_a_message_removed_by_another_reader_is_gone(maildir: Path) -> None:
    put(maildir, "1700000000.x", b"hello\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        (maildir / "new" / "1700000000.x").unlink()
        with pytest.raises(MessageGone):
            box.read_first(box.messages[0])
    finally:
        box.close()


# --- UPDATE (RFC 1939 §6) ---------------------------------------------------------------


def test_update_removes_only_deleted_and_marks_retrieved_seen(maildir: Path) -> None:
    put(maildir, "1700000000.keep", b"1\n")
    put(maildir, "1700000001.read", b"2\n")
    put(maildir, "1700000002.gone", b"3\n")
    put(maildir, "1700000003.flagged:2,F", b"4\n", sub="cur")
    put(maildir, "1700000004.seen:2,S", b"5\n", sub="cur")
    box = Pop3Mailbox.open(maildir, wire_size)
    by_name = {m.name.split(".")[1].split(":")[0]: m for m in box.messages}
    by_name["read"].retrieved = True
    by_name["gone"].deleted = True
    by_name["flagged"].retrieved = True
    by_name["seen"].retrieved = True
    result = box.update()
    box.close()
    assert (result.deleted, result.failed, result.seen) == (1, 0, 2)
    assert sorted(os.listdir(maildir / "new")) == ["1700000000.keep"]
    assert sorted(os.listdir(maildir / "cur")) == [
        "1700000001.read:2,S",
        "1700000003.flagged:2,FS",
        "1700000004.seen:2,S",
    ]


def test_rset_undoes_deletions(maildir: Path) -> None:
    put(maildir, "1700000000.a", b"1\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    box.messages[0].deleted = True
    assert box.get(1) is None and box.stat() == (0, 0)
    box.reset()
    assert box.stat() == (1, 3)
    assert box.update().deleted == 0
    box.close()
    assert os.listdir(maildir / "new") == ["1700000000.a"]


def test_closing_without_update_deletes_nothing(maildir: Path) -> None:
    put(maildir, "1700000000.a", b"1\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    box.messages[0].deleted = True
    box.close()
    assert os.listdir(maildir / "new") == ["1700000000.a"]


def test_update_deletes_a_message_another_reader_moved(maildir: Path) -> None:
    put(maildir, "1700000000.a", b"1\n")
    put(maildir, "1700000001.b", b"2\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    box.messages[0].deleted = True
    box.messages[1].deleted = True
    os.rename(maildir / "new" / "1700000000.a", maildir / "cur" / "1700000000.a:2,S")
    (maildir / "new" / "1700000001.b").unlink()  # already removed elsewhere: gone, not ours
    result = box.update()
    assert (result.deleted, result.failed) == (1, 0)
    assert box.messages[1].gone
    box.close()
    assert os.listdir(maildir / "cur") == [] and os.listdir(maildir / "new") == []


def test_mailbox_is_created_on_first_open(tmp_path: Path) -> None:
    path = tmp_path / "d" / "u"
    box = Pop3Mailbox.open(path, wire_size)
    box.close()
    assert all((path / sub).is_dir() for sub in ("tmp", "new", "cur"))


def test_ten_thousand_w_named_messages_list_without_reading(maildir: Path) -> None:
    # Empty files whose names claim 10 KiB: the sizes can only come from the
    # names, so the listing opened none of the 10,000 files.
    for i in range(10_000):
        put(maildir, f"{1700000000 + i}.M{i}.host,S=10000,W=10240", b"")
    messages = scan(maildir, wire_size)
    assert len(messages) == 10_000
    assert {m.size for m in messages} == {10240}
    assert len({m.uid for m in messages}) == 10_000
    assert [m.name for m in messages[:2]] == [
        "1700000000.M0.host,S=10000,W=10240",
        "1700000001.M1.host,S=10000,W=10240",
    ]


def test_read_ahead_returns_followers_whole_or_none(maildir: Path) -> None:
    put(maildir, "1700000000.a", b"first\n")
    put(maildir, "1700000001.b", b"second\n")
    put(maildir, "1700000002.c", b"third\n")
    put(maildir, "1700000003.d", b"fourth\n")
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        a, _b, c, d = box.messages
        (maildir / "new" / c.name).unlink()  # removed by another reader
        (maildir / "new" / d.name).write_bytes(b"grown well beyond its listed size\n")
        ahead = ReadAhead(box, None, retr_wire_form)
        assert asyncio.run(ahead.first(1, a)) == (b"first\n", None)
        assert [ahead.take(n) for n in (2, 3, 4)] == [b"second\r\n.\r\n", None, None]
        assert ahead.take(2) is None  # handed out once
    finally:
        box.close()


def test_read_ahead_reads_the_next_window_in_the_background(maildir: Path) -> None:
    count = 2 * AHEAD_COUNT + 10
    for i in range(1, count + 1):
        put(maildir, f"{1700000000 + i}.m", b"message %d\n" % i)
    box = Pop3Mailbox.open(maildir, wire_size)

    async def retr_all() -> list[bytes | None]:
        ahead = ReadAhead(box, None, retr_wire_form)
        first = box.get(1)
        assert first is not None
        got: list[bytes | None] = [retr_wire_form(*(await ahead.first(1, first))[:1], first.size)]
        for n in range(2, count + 1):
            got.append(await ahead.wait(n))  # read ahead by the time it is asked for
            ahead.refill(n)
        assert ahead.pending() == []
        return got

    try:
        assert asyncio.run(retr_all()) == [b"message %d\r\n.\r\n" % i for i in range(1, count + 1)]
    finally:
        box.close()


def test_read_ahead_skips_deleted_messages_and_windows_keep_to_a_budget(maildir: Path) -> None:
    big = b"x" * (AHEAD_BYTES // 2 - 10) + b"\n"
    for i, data in enumerate([b"one\n", b"two\n", big, big, big], 1):
        put(maildir, f"{1700000000 + i}.m", data)
    box = Pop3Mailbox.open(maildir, wire_size)
    try:
        box.messages[1].deleted = True  # DELE 2
        ahead = ReadAhead(box, None, retr_wire_form)
        first = box.get(1)
        assert first is not None
        asyncio.run(ahead.first(1, first))
        # 3 and 4 fill the first window; 5 came in the next (asyncio.run
        # waited for it); 2 was not read.
        assert [ahead.take(n) is not None for n in range(2, 6)] == [False, True, True, True]
    finally:
        box.close()
