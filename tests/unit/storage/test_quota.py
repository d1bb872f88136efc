"""storage/quota.py: the Maildir++ maildirsize file, recounts, sizes."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.mail.address import Address
from postoffice.storage.maildir import ensure_maildir
from postoffice.storage.quota import (
    MAILDIRSIZE,
    MAX_FILE,
    STALE_SECONDS,
    WANTED_SECONDS,
    QuotaTracker,
    Usage,
    count_blocking,
    doubtful,
    format_size,
    parse_size,
    read_recorded,
    record,
    recount_blocking,
    usage_blocking,
)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    path = tmp_path / "example.test" / "alice"
    ensure_maildir(path)
    return path


def deliver(maildir: Path, name: str, size: int, sub: str = "new") -> Path:
    path = maildir / sub / name
    path.write_bytes(b"x" * size)
    return path


def later(path: Path) -> None:
    """Make ``path``'s mtime a second newer than everything written before."""
    when = time.time() + 1
    os.utime(path, (when, when))


def test_count_uses_s_fields_stat_otherwise_and_maildir_plus_plus_folders(maildir: Path) -> None:
    deliver(maildir, "1.M1P1.host,S=100,W=102", 100)
    deliver(maildir, "2.M1P1.host,S=7000,W=7100:2,S", 7000, "cur")  # S= trusted, no stat
    deliver(maildir, "3.M1P1.host", 250)  # another tool's name: stat
    deliver(maildir, ".hidden", 999)  # not a message
    ensure_maildir(maildir / ".Sent")
    deliver(maildir / ".Sent", "4.M1P1.host,S=40", 40, "cur")
    assert count_blocking(maildir) == Usage(7390, 4)


def test_recount_writes_the_file_and_appends_keep_it_in_step(maildir: Path) -> None:
    deliver(maildir, "1.M1P1.host,S=100", 100)
    assert recount_blocking(maildir, 5000) == Usage(100, 1)
    assert (maildir / MAILDIRSIZE).read_text() == "5000S\n100 1\n"
    deliver(maildir, "2.M1P1.host,S=300", 300)
    record(maildir, 300, 1)
    record(maildir, -100, -1)
    recorded = read_recorded(maildir)
    assert recorded is not None
    assert recorded.usage == Usage(300, 1) and recorded.limit_line == "5000S"
    assert recorded.changes == 3
    assert not list((maildir / "tmp").iterdir())  # the recount's temporary file is gone


def test_an_append_never_creates_the_file(maildir: Path) -> None:
    record(maildir, 100, 1)
    assert not (maildir / MAILDIRSIZE).exists()


def test_a_file_grown_past_5120_bytes_is_left_for_a_recount(maildir: Path) -> None:
    recount_blocking(maildir, 0)
    for _ in range(MAX_FILE // len("100 1\n")):
        record(maildir, 100, 1)
    assert not (maildir / MAILDIRSIZE).exists()  # never grows without bound
    deliver(maildir, "1.M1P1.host,S=100", 100)
    assert usage_blocking(maildir, 0) == Usage(100, 1)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "5000S\n100\n",  # a change needs two numbers
        "5000S\n100 1\n-200 -1\n",  # negative sums: corrupt
        "5000S\n100 x\n",
        "5000S\n1\x000 1\n",
        "5000S\n" + "1 1\n" * (MAX_FILE // 4),  # too long: Maildir++ recounts
    ],
)
def test_untrustworthy_files_read_as_none(maildir: Path, content: str) -> None:
    (maildir / MAILDIRSIZE).write_text(content)
    assert read_recorded(maildir) is None


def test_a_torn_last_line_is_not_counted_yet(maildir: Path) -> None:
    (maildir / MAILDIRSIZE).write_text("5000S\n100 1\n   250 1")
    recorded = read_recorded(maildir)
    assert recorded is not None and recorded.usage == Usage(100, 1)


def test_courier_padded_lines(maildir: Path) -> None:
    (maildir / MAILDIRSIZE).write_text("5000S\n  100    1   \n")
    recorded = read_recorded(maildir)
    assert recorded is not None and recorded.usage == Usage(100, 1)


def test_doubt(maildir: Path) -> None:
    deliver(maildir, "1.M1P1.host,S=100", 100)
    recount_blocking(maildir, 5000)
    size_file = maildir / MAILDIRSIZE
    later(size_file)
    recorded = read_recorded(maildir)
    assert recorded is not None
    assert not doubtful(maildir, recorded, 5000)
    assert doubtful(maildir, recorded, 6000)  # another limit applies now
    assert doubtful(maildir, None, 5000)
    # Someone changed new/ after the last line: recount.
    later(maildir / "new")
    os.utime(maildir / "new", ns=(0, recorded.state[2] + 1))
    assert doubtful(maildir, recorded, 5000)


def test_over_quota_counts_are_trusted_for_15_minutes(maildir: Path) -> None:
    deliver(maildir, "1.M1P1.host,S=100", 100)
    recount_blocking(maildir, 50)
    size_file = maildir / MAILDIRSIZE
    later(size_file)
    fresh = read_recorded(maildir)
    assert fresh is not None and not doubtful(maildir, fresh, 50)
    old = time.time() - STALE_SECONDS - 60
    os.utime(maildir / "new", (old - 10, old - 10))
    os.utime(maildir / "cur", (old - 10, old - 10))
    os.utime(size_file, (old, old))
    stale = read_recorded(maildir)
    assert stale is not None
    assert doubtful(maildir, stale, 50)  # over quota and old
    size_file.write_text("5000S\n100 1\n")
    os.utime(size_file, (old, old))
    under = read_recorded(maildir)
    assert under is not None and not doubtful(maildir, under, 5000)  # an old count is fine


def test_usage_recounts_when_in_doubt(maildir: Path) -> None:
    deliver(maildir, "1.M1P1.host,S=100", 100)
    (maildir / MAILDIRSIZE).write_text("5000S\n0 0\n")  # lies, and is older than new/
    os.utime(maildir / MAILDIRSIZE, (1, 1))
    assert usage_blocking(maildir, 5000) == Usage(100, 1)
    assert (maildir / MAILDIRSIZE).read_text() == "5000S\n100 1\n"


@pytest.mark.parametrize(
    "text, size",
    [
        ("1048576", 1048576),
        ("0", 0),
        ("500M", 500 * 2**20),
        ("2G", 2 * 2**30),
        ("2g", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("10 KB", 10240),
        ("1T", 2**40),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "1.2.3G", "5X", "lots", "9" * 30])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(500 * 2**20) == "500 MiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(10) == "10 bytes"


def test_a_size_a_mailbox_had_no_room_for_counts_at_rcpt_for_a_while(maildir: Path) -> None:
    """After a deferred multi-recipient message (net/smtp_session.py), the
    retry is refused at RCPT for this mailbox: without SIZE= its last
    wanted size counts, with SIZE= the declared one does; not for ever."""
    alice = Address("alice", "example.test")
    deliver(maildir, "1.M1P1.host,S=20000", 20_000)
    now = [1000.0]

    async def run() -> None:
        with ThreadPoolExecutor(1) as pool:
            tracker = QuotaTracker(30_000, lambda a: None, pool)
            tracker._clock = lambda: now[0]
            assert not tracker.full(alice, maildir)  # not counted yet: starts a recount
            await tracker.room(alice, maildir, 0)
            assert not tracker.full(alice, maildir)
            tracker.no_room(maildir, 12_000)
            assert tracker.full(alice, maildir)  # no SIZE=: the 12,000 it lacked room for
            assert not tracker.full(alice, maildir, 3_000)  # a SIZE= that fits
            assert tracker.full(alice, maildir, 11_000)
            now[0] += WANTED_SECONDS + 1
            assert not tracker.full(alice, maildir)

    asyncio.run(run())
