"""The durable queue's files: commit, reload after a crash, state, removal, locking."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postoffice.delivery.queue import lane as lane_module
from postoffice.delivery.queue.records import QueueEntry, QueueError, RecipientState
from postoffice.delivery.queue.store import (
    ClaimedMessage,
    QueueStore,
    Released,
    Removal,
    Unclaimed,
)
from postoffice.delivery.queue.writer import SPILL_THRESHOLD
from postoffice.mail.address import Address
from postoffice.storage.errors import StorageFault

ALICE = Address("alice", "example.test")
BOB = Address("bob", "remote.test")
CAROL = Address("Carol.Quoted", "other.test")


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def queue(
    tmp_path: Path,
    executor: ThreadPoolExecutor,
    body: bytes,
    sender: Address | None = ALICE,
    recipients: tuple[Address, ...] = (BOB, CAROL),
) -> tuple[QueueStore, str, list[QueueEntry]]:
    store = QueueStore(tmp_path / "queue", executor)
    committed: list[QueueEntry] = []

    async def go() -> str:
        writer = store.writer(sender, list(recipients), on_commit=committed.append)
        for i in range(0, len(body), 1000):
            await writer.write(body[i : i + 1000])
        return await writer.commit()

    return store, asyncio.run(go()), committed


def body_of(store: QueueStore, entry: QueueEntry) -> bytes:
    with store.open_message_blocking(entry) as fh:
        return bytes(fh.read())


async def claimed(store: QueueStore, entry: QueueEntry) -> ClaimedMessage:
    claim = await store.claim(entry)
    assert isinstance(claim, ClaimedMessage)
    return claim


def test_commit_writes_one_file_and_reload_gives_the_same_envelope(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    content = b"Subject: hi\n\nhello\n"
    store, queue_id, committed = queue(tmp_path, executor, content)
    assert sorted(p.name for p in store.dir.iterdir()) == [f"{queue_id}.msg", "tmp"]
    assert list(store.tmp.iterdir()) == []
    (entry,) = committed
    assert entry.traits is not None and entry.traits.crlf_size == len(content) + 3
    # A new process (fresh store) finds it, recipients queued and due.
    (loaded,) = QueueStore(store.dir, executor).recover_blocking()
    assert loaded.envelope == entry.envelope
    assert [r.address for r in loaded.recipients] == [BOB, CAROL]
    assert all(r.state is RecipientState.QUEUED for r in loaded.recipients)
    assert body_of(store, loaded) == content


def test_large_message_streams_to_disk_before_commit(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    big = b"Subject: big\n\n" + b"y" * 99 + b"\n"

    async def go() -> tuple[list[Path], int, str]:
        writer = store.writer(ALICE, [BOB])
        for _ in range(SPILL_THRESHOLD // 100 * 3):
            await writer.write(big[14:])
        spilled = list(store.tmp.iterdir())
        size = spilled[0].stat().st_size if spilled else 0
        return spilled, size, await writer.commit()

    spilled, size, queue_id = asyncio.run(go())
    assert len(spilled) == 1 and size >= SPILL_THRESHOLD
    assert not spilled[0].exists()  # renamed into the queue
    assert store.msg_path(queue_id).stat().st_size > 3 * SPILL_THRESHOLD - 1000


def test_discard_leaves_nothing(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    store = QueueStore(tmp_path / "queue", executor)

    async def go() -> None:
        writer = store.writer(ALICE, [BOB])
        await writer.write(b"x" * (SPILL_THRESHOLD + 10))
        await writer.discard()

    asyncio.run(go())
    assert list(store.tmp.iterdir()) == []
    assert store.ids_blocking() == []


def test_null_sender_and_utf8_addresses_round_trip(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    utf8 = Address("j\u00f6rg", "example.test")
    store, _qid, _ = queue(tmp_path, executor, b"\n", sender=None, recipients=(utf8,))
    (loaded,) = store.recover_blocking()
    assert loaded.envelope.sender is None
    assert loaded.recipients[0].address == utf8


def test_state_is_saved_atomically_and_reloaded(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store, queue_id, (entry,) = queue(tmp_path, executor, b"Subject: s\n\nb\n")
    entry.recipients[0].state = RecipientState.DELIVERED
    entry.recipients[1].state = RecipientState.DEFERRED
    entry.recipients[1].attempts = 2
    entry.recipients[1].next_try = 12345.5
    entry.recipients[1].last_error = "451 4.7.1 try later"
    entry.recipients.append(type(entry.recipients[0])(Address("dave", "fwd.test")))
    entry.warned = True

    async def save() -> None:
        claim = await claimed(store, entry)
        await claim.save()
        await claim.unlock()

    asyncio.run(save())
    (loaded,) = QueueStore(store.dir, executor).recover_blocking()
    assert [r.state for r in loaded.recipients] == [
        RecipientState.DELIVERED,
        RecipientState.DEFERRED,
        RecipientState.QUEUED,
    ]
    assert loaded.recipients[1].next_try == 12345.5
    assert loaded.recipients[1].last_error == "451 4.7.1 try later"
    assert loaded.recipients[2].address == Address("dave", "fwd.test")
    assert loaded.warned and loaded.next_due() == 0.0
    assert store.remove_blocking(queue_id) is Removal.REMOVED
    assert sorted(p.name for p in store.dir.iterdir()) == ["tmp"]


def test_recovery_drops_stale_tmp_and_orphans_but_not_fresh_tmp(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store, queue_id, _ = queue(tmp_path, executor, b"\nbody\n")
    stale = store.tmp / "old.partial"
    stale.write_bytes(b"half a message")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    orphan = store.state_path("00000000000deadbeef")
    orphan.write_bytes(b"{}")
    later = QueueStore(store.dir, executor)
    fresh = store.tmp / "being-received-now"
    fresh.write_bytes(b"in flight")
    (entry,) = later.recover_blocking()
    assert entry.queue_id == queue_id
    assert not stale.exists() and not orphan.exists()
    assert fresh.exists()


def test_remove_takes_the_lock_or_leaves_a_request(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store, queue_id, _ = queue(tmp_path, executor, b"\nbody\n")
    fd = store.try_lock_blocking(queue_id)
    assert fd is not None
    # While a delivery attempt holds the lock, removal is only requested ...
    assert store.remove_blocking(queue_id) is Removal.REQUESTED
    assert store.tombstone_path(queue_id).exists() and store.msg_path(queue_id).exists()
    assert store.try_lock_blocking(queue_id) is None  # flock excludes a second holder
    store.unlock_blocking(fd)
    # ... and a restart applies it.
    assert QueueStore(store.dir, executor).recover_blocking() == []
    assert store.ids_blocking() == []
    assert store.remove_blocking(queue_id) is Removal.MISSING
    assert store.remove_blocking("../../etc/passwd") is Removal.MISSING


def test_remove_when_idle_deletes_at_once(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    store, queue_id, _ = queue(tmp_path, executor, b"\nbody\n")
    assert store.remove_blocking(queue_id) is Removal.REMOVED
    assert sorted(p.name for p in store.dir.iterdir()) == ["tmp"]


def test_flush_request_is_taken_once(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    store.ensure_dirs()
    requests = store.requests
    assert not requests.take_flush_request_blocking()
    requests.request_flush_blocking()
    assert requests.take_flush_request_blocking()
    assert not requests.take_flush_request_blocking()


def test_adoption_requests_are_taken_once_and_only_for_queue_ids(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    store.ensure_dirs()
    store.requests.request_adoption_blocking("019c4a1f2b3d4e5f6a7b")
    (store.dir / "../x.adopt").touch()  # not in the queue directory
    (store.dir / "NOT_AN_ID.adopt").touch()
    assert store.requests.take_adoption_requests_blocking() == ["019c4a1f2b3d4e5f6a7b"]
    assert store.requests.take_adoption_requests_blocking() == []


def test_list_shows_sizes(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    store, queue_id, _ = queue(tmp_path, executor, b"Subject: s\n\n12345\n")
    ((entry, size),) = list(store.entries_blocking())
    assert entry.queue_id == queue_id and size == len(b"Subject: s\n\n12345\n")


def test_concurrent_commits_share_directory_fsyncs_and_all_are_durable(
    tmp_path: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    store.ensure_dirs()
    dir_syncs: list[Path] = []
    real_fsync_dir = lane_module.fsync_dir

    def counting_fsync_dir(path: Path) -> None:
        dir_syncs.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr(lane_module, "fsync_dir", counting_fsync_dir)
    count = 30

    async def go() -> list[str]:
        writers = [store.writer(ALICE, [BOB]) for _ in range(count)]
        for i, w in enumerate(writers):
            await w.write(b"Subject: %d\n\nbody %d\n" % (i, i))
        return list(await asyncio.gather(*(w.commit() for w in writers)))

    ids = asyncio.run(go())
    assert len(set(ids)) == count
    assert sorted(store.ids_blocking()) == sorted(ids)
    # Grouped: far fewer directory fsyncs than messages, and at least one.
    assert 1 <= len(dir_syncs) < count
    assert set(dir_syncs) == {store.dir}
    for entry in QueueStore(store.dir, executor).recover_blocking():
        assert body_of(store, entry).startswith(b"Subject: ")


def test_a_failing_message_does_not_fail_the_rest_of_its_group(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    store.ensure_dirs()

    def broken_head(content: bytes) -> bytes:
        raise OSError(28, "No space left on device")

    async def go() -> list[object]:
        good = [store.writer(ALICE, [BOB]) for _ in range(3)]
        bad = store.writer(ALICE, [CAROL])
        for w in good:
            await w.write(b"Subject: ok\n\nfine\n")
        return list(
            await asyncio.gather(
                *(w.commit() for w in good),
                bad.commit_with_head(b"Subject: bad\n\nx\n", broken_head),
                return_exceptions=True,
            )
        )

    *good_ids, failure = asyncio.run(go())
    assert isinstance(failure, QueueError) and failure.fault is StorageFault.NO_SPACE
    assert sorted(store.ids_blocking()) == sorted(good_ids)  # type: ignore[type-var]
    assert list(store.tmp.iterdir()) == []  # the failed one left nothing behind


def test_commit_with_head_puts_the_head_on_top_and_counts_it(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    store.ensure_dirs()
    content = b"From: alice@example.test\nSubject: signed\n\nbody\n"
    head = b"DKIM-Signature: v=1; a=ed25519-sha256; b=abc\n"
    seen: list[bytes] = []
    committed: list[QueueEntry] = []

    def sign(message: bytes) -> bytes:
        seen.append(message)
        return head

    async def go() -> str:
        writer = store.writer(ALICE, [BOB], on_commit=committed.append)
        return await writer.commit_with_head(content, sign)

    asyncio.run(go())
    assert seen == [content]  # the head is computed over the content as given
    (entry,) = committed
    assert body_of(store, entry) == head + content
    assert entry.traits is not None
    assert entry.traits.crlf_size == len(head + content) + (head + content).count(b"\n")
    (loaded,) = QueueStore(store.dir, executor).recover_blocking()
    assert body_of(store, loaded) == head + content


def test_commit_with_head_refuses_a_writer_that_has_content(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = QueueStore(tmp_path / "queue", executor)

    async def go() -> None:
        writer = store.writer(ALICE, [BOB])
        await writer.write(b"Subject: x\n\n")
        await writer.commit_with_head(b"body\n", lambda _c: b"")

    with pytest.raises(RuntimeError):
        asyncio.run(go())


async def read_all(claim: ClaimedMessage) -> list[bytes]:
    traits = await claim.traits()
    return [chunk async for chunk in claim.message(traits).chunks()]


def test_a_claim_holds_the_lock_and_a_finished_message_is_deleted_at_release(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    content = b"Subject: s\n\n" + b"z" * 100 + b"\n"
    store, queue_id, (entry,) = queue(tmp_path, executor, content)

    async def go() -> None:
        claim = await claimed(store, entry)
        assert store.try_lock_blocking(queue_id) is None  # we hold the lock
        assert await store.claim(entry) is Unclaimed.BUSY
        # Read with the lock (one trip), and from the file for a second courier.
        assert await read_all(claim) == [content]
        assert await read_all(claim) == [content]
        assert await claim.read_head(10) == content[:10]
        for r in entry.recipients:
            r.state = RecipientState.DELIVERED
        assert await claim.release() is Released.FINISHED
        assert not claim.locked
        assert store.ids_blocking() == []
        assert await store.claim(entry) is Unclaimed.GONE

    asyncio.run(go())


def test_a_long_message_is_read_in_chunks_each_time(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    content = b"Subject: s\n\n" + (b"z" * 99 + b"\n") * 1500
    store, _queue_id, (entry,) = queue(tmp_path, executor, content)

    async def go() -> None:
        claim = await claimed(store, entry)
        for _ in range(2):
            chunks = await read_all(claim)
            assert len(chunks) > 1 and b"".join(chunks) == content
        await claim.unlock()
        assert not claim.locked

    asyncio.run(go())
    fd = store.try_lock_blocking(entry.queue_id)
    assert fd is not None  # unlocked
    store.unlock_blocking(fd)


def test_release_writes_pending_state_and_deletes_a_state_file_only_if_there_is_one(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store, queue_id, (entry,) = queue(tmp_path, executor, b"\nbody\n")

    async def go(store: QueueStore, entry: QueueEntry, state: RecipientState) -> Released:
        claim = await claimed(store, entry)
        for r in entry.recipients:
            r.state = state
        return await claim.release()

    assert asyncio.run(go(store, entry, RecipientState.DEFERRED)) is Released.KEPT
    assert entry.state_on_disk and store.state_path(queue_id).exists()
    (loaded,) = QueueStore(store.dir, executor).recover_blocking()
    assert loaded.state_on_disk
    assert [r.state for r in loaded.recipients] == [RecipientState.DEFERRED] * 2
    assert asyncio.run(go(store, loaded, RecipientState.BOUNCED)) is Released.FINISHED
    assert sorted(p.name for p in store.dir.iterdir()) == ["tmp"]
    # A message that never had one: only the .msg goes.
    store2, _queue_id2, (entry2,) = queue(tmp_path / "two", executor, b"\nbody\n")
    assert not entry2.state_on_disk
    assert asyncio.run(go(store2, entry2, RecipientState.DELIVERED)) is Released.FINISHED
    assert sorted(p.name for p in store2.dir.iterdir()) == ["tmp"]


def test_a_removal_asked_for_during_a_claim_wins_at_release(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store, queue_id, (entry,) = queue(tmp_path, executor, b"\nbody\n")

    async def go() -> Released:
        claim = await claimed(store, entry)
        assert store.remove_blocking(queue_id) is Removal.REQUESTED
        return await claim.release()  # recipients still pending: it would be kept

    assert asyncio.run(go()) is Released.REMOVED
    assert sorted(p.name for p in store.dir.iterdir()) == ["tmp"]


def test_a_removal_asked_for_while_the_cli_held_the_lock_is_done_at_the_next_claim(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store, queue_id, (entry,) = queue(tmp_path, executor, b"\nbody\n")
    fd = store.try_lock_blocking(queue_id)
    assert fd is not None
    assert store.remove_blocking(queue_id) is Removal.REQUESTED
    store.unlock_blocking(fd)
    assert asyncio.run(store.claim(entry)) is Unclaimed.GONE
    assert sorted(p.name for p in store.dir.iterdir()) == ["tmp"]


# --- lines over 998 octets (mail/folding.py) -------------------------------------

LONG = b"L" * 2500


def test_long_lines_are_folded_as_they_enter_the_queue(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    content = b"Subject: long\n\n" + LONG + b"\nend\n"
    store, _queue_id, committed = queue(tmp_path, executor, content)  # 1000-octet writes
    (entry,) = committed
    stored = body_of(store, entry)
    assert stored == b"Subject: long\n\n" + LONG[:998] + b"\n " + LONG[998:1995] + b"\n " + (
        LONG[1995:] + b"\nend\n"
    )
    assert max(len(line) for line in stored.split(b"\n")) == 998
    assert entry.traits is not None  # SIZE is that of what is sent
    assert entry.traits.crlf_size == len(stored) + stored.count(b"\n")


def test_commit_with_head_signs_the_folded_form(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    store = QueueStore(tmp_path / "queue", executor)
    store.ensure_dirs()
    content = b"From: alice@example.test\nX-Long: " + LONG + b"\n\n" + LONG + b"\n"
    seen: list[bytes] = []
    committed: list[QueueEntry] = []

    def sign(message: bytes) -> bytes:
        seen.append(message)
        return b"DKIM-Signature: v=1; b=abc\n"

    async def go() -> str:
        writer = store.writer(ALICE, [BOB], on_commit=committed.append)
        return await writer.commit_with_head(content, sign)

    asyncio.run(go())
    (signed,) = seen
    assert max(len(line) for line in signed.split(b"\n")) == 998
    assert signed.replace(b"\n ", b"") == content.replace(b"\n ", b"")  # only breaks added
    (entry,) = committed
    assert body_of(store, entry) == b"DKIM-Signature: v=1; b=abc\n" + signed
