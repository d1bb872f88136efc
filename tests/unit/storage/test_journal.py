"""The delivery journal on real files: records, torn tails, checkpoints, reuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postoffice.storage.journal import (
    Journal,
    JournalError,
    check_target,
    encode,
    scan_segment,
)
from tests.support.journal import pending_records

SEG = 64 * 1024


def target(i: int) -> str:
    return f"example.test/alice/new/{i}.M1P1Q{i}.host,S=5,W=6"


def fresh(directory: Path, segments: int = 2) -> Journal:
    journal = Journal(directory, SEG, segments)
    assert journal.open() == []
    journal.reset()
    return journal


def append(journal: Journal, count: int, size: int = 1000) -> list[int]:
    """Append ``count`` records one per call; their sequence numbers."""
    seqs = []
    for _ in range(count):
        seq = journal.next_seq
        data = (b"%d\n" % seq).ljust(size, b"x")
        assert journal.append([encode(seq, [target(seq)], data)]) == 1
        seqs.append(seq)
    return seqs


def test_records_round_trip_and_survive_reopening(tmp_path: Path) -> None:
    journal = fresh(tmp_path)
    data = b"Subject: hi\n\n\x00\xff binary\n"
    two = [target(0), "example.test/bob/new/x,S=1,W=1"]
    assert journal.append([encode(0, two, data), encode(1, [target(1)], b"")]) == 2
    journal.close()
    again = Journal(tmp_path, SEG, 2)
    records = again.open()
    assert [(r.seq, r.targets, r.data) for r in records] == [
        (0, tuple(two), data),
        (1, (target(1),), b""),
    ]
    assert again.next_seq == 2
    assert pending_records(tmp_path, 2) == records


def test_the_checkpoint_hides_retired_records(tmp_path: Path) -> None:
    journal = fresh(tmp_path)
    append(journal, 5)
    journal.write_checkpoint(3)
    journal.close()
    assert [r.seq for r in pending_records(tmp_path, 2)] == [3, 4]
    again = Journal(tmp_path, SEG, 2)
    assert [r.seq for r in again.open()] == [3, 4]
    again.reset()  # everything restored: numbering goes on after the last record
    assert again.next_seq == 5 and pending_records(tmp_path, 2) == []


def test_a_torn_record_ends_the_segment(tmp_path: Path) -> None:
    journal = fresh(tmp_path)
    append(journal, 3)
    journal.close()
    segment = tmp_path / "segment-0"
    raw = bytearray(segment.read_bytes())
    third = raw.find(b"2\nxxx")  # the body of record 2
    raw[third + 500] ^= 0xFF
    segment.write_bytes(bytes(raw))
    assert [r.seq for r in pending_records(tmp_path, 2)] == [0, 1]


def test_a_bad_checkpoint_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    journal = fresh(tmp_path)  # reset wrote checkpoint 0 (counter 1, slot 1)
    append(journal, 4)
    journal.write_checkpoint(2)  # counter 2, slot 0
    journal.close()
    assert [r.seq for r in pending_records(tmp_path, 2)] == [2, 3]
    cp = tmp_path / "checkpoint"
    raw = bytearray(cp.read_bytes())
    raw[10] ^= 0xFF  # break slot 0: the older slot (low water 0) counts again
    cp.write_bytes(bytes(raw))
    assert [r.seq for r in pending_records(tmp_path, 2)] == [0, 1, 2, 3]


def test_full_until_retired_then_segments_are_reused(tmp_path: Path) -> None:
    journal = fresh(tmp_path, segments=2)
    record = 10_000
    per_segment = SEG // (record + 64)
    seqs = append(journal, 2 * per_segment, size=record)  # both segments full
    blocked = encode(journal.next_seq, [target(999)], b"y" * record)
    assert journal.append([blocked]) == 0  # segment 0 still holds unretired records
    journal.write_checkpoint(seqs[per_segment - 1] + 1)  # segment 0 retired
    assert journal.append([blocked]) == 1
    newest = journal.next_seq - 1
    journal.close()
    # Segment 0 now starts with the new record; the old ones after it are
    # below the checkpoint and never come back.
    pending = [r.seq for r in pending_records(tmp_path, 2)]
    assert pending == [*seqs[per_segment:], newest]


def test_append_refuses_a_record_larger_than_a_segment(tmp_path: Path) -> None:
    journal = fresh(tmp_path)
    assert not journal.fits(SEG)
    with pytest.raises(JournalError):
        journal.append([encode(0, [target(0)], b"z" * SEG)])


@pytest.mark.parametrize(
    "bad",
    [
        "example.test/alice/cur/x",
        "example.test/../new/x",
        "/etc/new/passwd",
        "example.test/alice/new/../../x",
        "example.test/alice/new",
        "a//new/x",
    ],
)
def test_targets_outside_a_new_directory_are_refused(bad: str) -> None:
    with pytest.raises(JournalError):
        check_target(bad)
    record = encode(0, [bad], b"data")
    with pytest.raises(JournalError):
        list(scan_segment(record, 0))


def test_segments_are_written_once_and_their_size_kept(tmp_path: Path) -> None:
    fresh(tmp_path, segments=3).close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert sizes == {"segment-0": SEG, "segment-1": SEG, "segment-2": SEG, "checkpoint": 1024}
    assert all(os.stat(tmp_path / f"segment-{i}").st_blocks * 512 >= SEG for i in range(3))
