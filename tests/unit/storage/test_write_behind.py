"""Journaled delivery through MaildirStore on real files: visible at once,
retired durably, restored after a crash, backpressure when retiring lags."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.mail.address import Address
from postoffice.storage import safeio, write_behind
from postoffice.storage.held import hold, read_held, release
from postoffice.storage.journal import Record, encode
from postoffice.storage.maildir import SPILL_THRESHOLD, MaildirStore
from tests.support.journal import pending_records

ALICE = Address("alice", "example.test")
BOB = Address("bob", "example.test")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4)
    yield pool
    pool.shutdown(wait=True)


def store(tmp_path: Path, executor: ThreadPoolExecutor, **shape: int) -> MaildirStore:
    s = MaildirStore(tmp_path / "mail", executor, "host", tmp_path / "journal", **shape)
    s.recover()
    return s


def message(i: int, size: int = 3000) -> bytes:
    return (b"Subject: %d\n\n" % i).ljust(size, b"m") + b"\n"


async def deliver(s: MaildirStore, data: bytes, *to: Address) -> list[Path]:
    writer = s.writer(list(to or [ALICE]))
    await writer.write(data)
    return await writer.commit()


def stored(mail: Path, who: str = "alice") -> dict[bytes, int]:
    """Message contents in new/ and cur/, with how often each is there."""
    found: dict[bytes, int] = {}
    for sub in ("new", "cur"):
        for path in (mail / "example.test" / who / sub).iterdir():
            data = path.read_bytes()
            found[data] = found.get(data, 0) + 1
    return found


def pause_retiring(s: MaildirStore) -> None:
    """Stand-in for a crash before the retire lane ran: it never starts."""
    assert s._behind is not None
    s._behind._retiring = True


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_visible_at_once_and_retired_durably(
    tmp_path: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    # Both ways of retiring: one syncfs (Linux 5.8+), or an fsync per file.
    monkeypatch.setattr(write_behind, "SYNCFS_RELIABLE", syncfs and write_behind.SYNCFS_RELIABLE)
    s = store(tmp_path, executor)

    async def run() -> list[list[Path]]:
        paths = await asyncio.gather(*(deliver(s, message(i)) for i in range(40)))
        for i, files in enumerate(paths):  # there the moment commit returns
            assert files[0].read_bytes() == message(i)
            assert files[0].name.endswith(f",S={len(message(i))},W={len(message(i)) + 3}")
        await s.drain()
        return paths

    asyncio.run(run())
    s.close()
    assert pending_records(tmp_path / "journal") == []  # all retired
    assert stored(tmp_path / "mail") == {message(i): 1 for i in range(40)}
    assert list((tmp_path / "mail" / "example.test" / "alice" / "tmp").iterdir()) == []


def test_several_mailboxes_share_one_record(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    s = store(tmp_path, executor)
    files = asyncio.run(deliver(s, message(1), ALICE, BOB))
    assert [p.parent.parent.name for p in files] == ["alice", "bob"]
    assert os.path.samefile(files[0], files[1])  # one file, hard-linked
    s.close()


def test_a_crash_before_retiring_restores_every_message(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    s = store(tmp_path, executor)
    pause_retiring(s)

    async def run() -> list[list[Path]]:
        return [await deliver(s, message(i)) for i in range(12)]

    paths = [files[0] for files in asyncio.run(run())]
    s.close()  # the "crash": retirement never happened
    assert len(pending_records(tmp_path / "journal")) == 12
    # What a power cut can leave of files that were never flushed.
    paths[0].write_bytes(b"")  # no data
    paths[1].write_bytes(message(1)[:100])  # part of it
    paths[2].unlink()  # the rename was lost
    cur = paths[3].parent.parent / "cur" / (paths[3].name + ":2,S")
    os.rename(paths[3], cur)  # a POP3 client had marked it seen...
    cur.write_bytes(b"")  # ...before its data reached the disk
    again = store(tmp_path, executor)
    again.close()
    assert stored(tmp_path / "mail") == {message(i): 1 for i in range(12)}
    assert cur.read_bytes() == message(3)  # restored in place, flags kept
    assert pending_records(tmp_path / "journal") == []
    assert list((tmp_path / "mail" / "example.test" / "alice" / "tmp").iterdir()) == []


def test_commits_wait_for_room_and_none_is_lost(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    s = store(tmp_path, executor, journal_segment_size=64 * 1024, journal_segments=2)
    pause_retiring(s)

    async def run() -> None:
        tasks = [asyncio.ensure_future(deliver(s, message(i, 10_000))) for i in range(30)]
        await asyncio.sleep(0.5)
        done = sum(t.done() for t in tasks)
        assert 6 <= done < 30  # the journal holds about 12; the rest wait
        assert s._behind is not None
        s._behind._retiring = False
        s._behind._kick_retire()  # retiring resumes: room again
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await s.drain()

    asyncio.run(run())
    s.close()
    assert stored(tmp_path / "mail") == {message(i, 10_000): 1 for i in range(30)}
    assert pending_records(tmp_path / "journal", 2) == []


def test_large_messages_and_a_busy_journal_take_the_direct_path(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    s = store(tmp_path, executor)
    other = MaildirStore(tmp_path / "mail", executor, "host", tmp_path / "journal")
    assert other.recover() == 0  # the journal is taken: this one delivers without it
    big = message(7, SPILL_THRESHOLD + 10)

    async def run() -> None:
        await deliver(s, big)  # spilled to tmp/ while arriving: not journaled
        await deliver(other, message(8))
        await s.drain()

    asyncio.run(run())
    assert pending_records(tmp_path / "journal") == []
    other.close()
    s.close()
    assert stored(tmp_path / "mail") == {big: 1, message(8): 1}


def test_a_broken_mailbox_holds_back_only_its_own_messages(
    tmp_path: Path, executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """review #5: records for a mailbox that cannot be written (a file where
    tmp/ belongs), then for alice.  The first start restores alice's, holds
    bob's durably (logged, with a count) and uses the journal as usual; the
    start after bob's mailbox is fixed restores his.  Nothing is lost, and
    nothing is delivered twice."""
    s = store(tmp_path, executor, journal_segment_size=64 * 1024, journal_segments=2)
    pause_retiring(s)

    async def run(target: MaildirStore) -> None:
        await deliver(target, message(0), BOB)
        await deliver(target, message(1), BOB)
        await deliver(target, message(2), ALICE, BOB)  # one record, two mailboxes
        await deliver(target, message(3), ALICE)

    asyncio.run(run(s))
    s.close()  # the "crash": nothing retired
    mail = tmp_path / "mail" / "example.test"
    for who in ("alice", "bob"):  # a power cut took the unflushed files
        for path in (mail / who / "new").iterdir():
            path.unlink()
    bob_tmp = mail / "bob" / "tmp"
    bob_tmp.rmdir()
    bob_tmp.write_bytes(b"")  # tmp/ is not a directory: nothing can be written to bob
    held = tmp_path / "journal" / "unrestored"

    first = MaildirStore(
        tmp_path / "mail",
        executor,
        "host",
        tmp_path / "journal",
        journal_segment_size=64 * 1024,
        journal_segments=2,
    )
    assert first.recover() == 2  # message 3, and message 2 for alice
    assert stored(tmp_path / "mail") == {message(2): 1, message(3): 1}
    assert f"mailbox {mail / 'bob'}: 3 acknowledged messages cannot be restored now" in caplog.text
    assert len(os.listdir(held)) == 3
    assert first._behind is not None  # the journal is in use again

    async def then() -> None:
        await deliver(first, message(4))
        await first.drain()

    asyncio.run(then())
    first.close()
    assert pending_records(tmp_path / "journal", 2) == []

    # Still broken at the next start: still held, nothing restored twice.
    second = store(tmp_path, executor, journal_segment_size=64 * 1024, journal_segments=2)
    second.close()
    assert len(os.listdir(held)) == 3
    assert stored(tmp_path / "mail") == {message(i): 1 for i in (2, 3, 4)}

    bob_tmp.unlink()
    bob_tmp.mkdir()
    third = MaildirStore(
        tmp_path / "mail",
        executor,
        "host",
        tmp_path / "journal",
        journal_segment_size=64 * 1024,
        journal_segments=2,
    )
    assert third.recover() == 3
    third.close()
    assert os.listdir(held) == []
    assert stored(tmp_path / "mail", "bob") == {message(i): 1 for i in range(3)}
    assert stored(tmp_path / "mail") == {message(i): 1 for i in (2, 3, 4)}


def test_syncfs_watches_the_mail_file_system_before_any_write(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    # syncfs reports only writeback errors after its descriptor was opened,
    # so that descriptor is taken at start, not at the first retirement.
    if not write_behind.SYNCFS_RELIABLE:
        pytest.skip("no syncfs that reports writeback errors here")
    (tmp_path / "mail").mkdir()
    s = store(tmp_path, executor)
    try:
        behind = s._behind
        assert behind is not None
        assert list(behind._sync_fds) == [os.stat(tmp_path / "mail").st_dev]
    finally:
        s.close()


@pytest.mark.parametrize("size", [3000, 400_000], ids=["journaled", "direct"])
def test_where_no_hard_link_is_possible_each_mailbox_gets_a_copy(
    tmp_path: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    # Mailboxes on different file systems (link(2) fails with EXDEV), both
    # ways a message is stored: through the journal and straight to Maildir.
    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(safeio.os, "link", no_link)
    s = store(tmp_path, executor)

    async def run() -> list[Path]:
        files = await deliver(s, message(7, size), ALICE, BOB)
        await s.drain()
        return files

    files = asyncio.run(run())
    s.close()
    assert not os.path.samefile(files[0], files[1])  # two files
    for who in ("alice", "bob"):
        assert stored(tmp_path / "mail", who) == {message(7, size): 1}
        assert list((tmp_path / "mail" / "example.test" / who / "tmp").iterdir()) == []


def test_a_link_error_that_is_not_about_links_is_raised(tmp_path: Path) -> None:
    source = tmp_path / "a"
    source.write_bytes(b"x")
    copies: list[Path] = []
    with pytest.raises(FileNotFoundError):  # ENOENT: a real failure, not "no hard links"
        safeio.link_or_copy(source, tmp_path / "missing" / "b", copies.append)
    assert copies == []


def test_held_records_are_read_whole_or_left_alone(tmp_path: Path) -> None:
    """storage/held.py: a held file is one intact journal record, or it is
    neither used nor deleted (a later start, or a person, can look at it)."""
    directory = tmp_path / "unrestored"
    record = Record(7, ("example.test/bob/new/1.x", "example.test/carol/new/1.x"), b"m\n")
    hold(directory, record, ["example.test/carol/new/1.x"])
    (directory / "9").write_bytes(encode(9, ["example.test/bob/new/2.x"], b"n\n")[:-1])
    ((where, back),) = read_held(directory)
    assert where == directory / "7"
    assert back == Record(7, ("example.test/carol/new/1.x",), b"m\n")
    release(directory, 7)
    assert read_held(directory) == [] and os.listdir(directory) == ["9"]
