"""The delivery journal: one disk flush makes a batch of small messages durable.

Why: a Maildir delivery that is durable before its "250" costs two journal
commits of the file system (fsync of the new file, fsync of ``new/`` after
the rename).  Appending the message to a preallocated file and flushing
that with ``fdatasync`` costs one cache flush and no file-system commit at
all (the blocks and the file size exist already, so only data is written).
The Maildir files are then written without waiting and made durable in the
background (``storage/write_behind.py``); the journal keeps every message
until its files are.

On disk, in ``data_dir/journal/``::

    segment-0 .. segment-N   fixed-size files, zero-filled once when created
    checkpoint               two 512-byte slots; the valid one with the higher
                             counter holds ``low_water``: every record with a
                             smaller sequence number is in its Maildirs durably

A segment is a run of records from offset 0::

    header  "POJ1" | kind u8 | 0 u8 | targets u16 | body length u32 |
            sequence u64 | crc32 u32 (of the header before it and the body)
    body    per target: u16 length + UTF-8 path relative to mail_dir
            ("domain/local/new/name"), then the message (LF form)

Sequence numbers grow by one per record for the life of the data
directory.  Segments are used in turn; one is written again only when the
checkpoint is past every record in it, so old records left after the new
end of a reused segment have smaller numbers than the checkpoint (and than
the records before them) and are never taken for new ones.  Reading stops
at the first record in a segment that is not intact (a write a crash cut
short: that batch was never acknowledged) or whose number does not grow.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from postoffice.storage.safeio import fsync_dir, write_all

MAGIC = b"POJ1"
KIND_DELIVERY = 1
_HEADER = struct.Struct("<4sBBHIQI")  # magic, kind, 0, targets, body length, sequence, crc
_CHECKPOINT = struct.Struct("<4sQQI")  # magic, low_water, counter, crc
_CHECKPOINT_MAGIC = b"POJC"
_SLOT = 512
SEGMENT_SIZE = 4 * 1024 * 1024
SEGMENTS = 4
_ZEROS = bytes(1024 * 1024)


class JournalError(Exception):
    """The journal cannot be used (unreadable, or a record that makes no sense)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One message: where its files go (relative to mail_dir) and its content."""

    seq: int
    targets: tuple[str, ...]
    data: bytes


def encode(seq: int, targets: Sequence[str], data: bytes) -> bytes:
    """The bytes of one delivery record."""
    parts = []
    for target in targets:
        raw = target.encode("utf-8")
        parts.append(struct.pack("<H", len(raw)))
        parts.append(raw)
    parts.append(data)
    body = b"".join(parts)
    head = _HEADER.pack(MAGIC, KIND_DELIVERY, 0, len(targets), len(body), seq, 0)[:-4]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + body


def check_target(target: str) -> str:
    """``domain/local/new/name``, nothing else: a journal names no other path."""
    parts = PurePosixPath(target).parts
    if (
        len(parts) != 4
        or parts[2] != "new"
        or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts)
        or target != "/".join(parts)
    ):
        raise JournalError(f"bad target path in journal: {target!r}")
    return target


def parse_checkpoint(raw: bytes) -> tuple[int, int]:
    """(low_water, counter) of the valid slot with the higher counter in the
    checkpoint file's ``raw`` bytes; (0, 0) when neither slot is valid."""
    best = (0, 0)
    for slot in range(2):
        chunk = raw[slot * _SLOT : slot * _SLOT + _CHECKPOINT.size]
        if len(chunk) < _CHECKPOINT.size:
            continue
        magic, low, counter, crc = _CHECKPOINT.unpack(chunk)
        if magic == _CHECKPOINT_MAGIC and zlib.crc32(chunk[:-4]) == crc and counter >= best[1]:
            best = (low, counter)
    return best


def scan_segment(buf: bytes, low_water: int) -> Iterator[Record]:
    """The intact records of one segment with sequence numbers from ``low_water`` on."""
    pos = 0
    last = -1
    size = _HEADER.size
    while pos + size <= len(buf):
        magic, kind, _zero, count, length, seq, crc = _HEADER.unpack_from(buf, pos)
        end = pos + size + length
        if magic != MAGIC or kind != KIND_DELIVERY or end > len(buf) or seq <= last:
            return
        body = buf[pos + size : end]
        if zlib.crc32(body, zlib.crc32(buf[pos : pos + size - 4])) != crc:
            return  # torn by a crash: neither it nor anything after it was acknowledged
        last, pos = seq, end
        if seq < low_water:
            continue
        targets = []
        at = 0
        for _ in range(count):
            (n,) = struct.unpack_from("<H", body, at)
            targets.append(check_target(body[at + 2 : at + 2 + n].decode("utf-8")))
            at += 2 + n
        yield Record(seq, tuple(targets), body[at:])


class Journal:
    """The journal files; blocking methods, one writer thread at a time.

    ``append`` is called by one batch at a time (the commit lane); ``retire``
    by one batch at a time (the retire lane); they share only
    ``durable_low_water``, which ``retire`` raises after its flush.
    """

    def __init__(
        self, directory: Path, segment_size: int = SEGMENT_SIZE, segments: int = SEGMENTS
    ) -> None:
        if segments < 2 or segment_size < 64 * 1024:
            raise ValueError("a journal needs at least two segments of 64 KiB")
        self.directory = directory
        self.segment_size = segment_size
        self._fds: list[int] = []
        self._seg_count = segments
        self._current = 0  # the segment being written
        self._offset = 0  # where the next record goes in it
        self._seg_max: list[int] = [-1] * segments  # highest sequence in each segment
        self.next_seq = 0
        self.durable_low_water = 0
        self._checkpoint_fd = -1
        self._checkpoint_counter = 0

    # --- opening and recovery ---------------------------------------------------------
    def open(self) -> list[Record]:
        """Create or open the files; return the records not yet known to be in
        their Maildirs, oldest first.  The caller restores them and then calls
        ``reset`` before the first ``append``."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cp_path = self.directory / "checkpoint"
        self._checkpoint_fd = os.open(cp_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        created = False
        if os.fstat(self._checkpoint_fd).st_size != 2 * _SLOT:
            self._zero_fill(self._checkpoint_fd, 2 * _SLOT)
            created = True
        low_water, self._checkpoint_counter = self._read_checkpoint()
        # Read every segment before any is (re)made: one of another size (a
        # build with other constants) still gives up its records.
        records: list[Record] = []
        top = low_water - 1
        for i in range(self._seg_count):
            path = self.directory / f"segment-{i}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fds.append(fd)
            size = os.fstat(fd).st_size
            for record in scan_segment(os.pread(fd, size, 0), 0):
                top = max(top, record.seq)
                if record.seq >= low_water:
                    records.append(record)
        if created:
            fsync_dir(self.directory)
        records.sort(key=lambda r: r.seq)
        self.next_seq = top + 1
        self.durable_low_water = low_water
        return records

    def reset(self) -> None:
        """Everything recovered is in its Maildirs: start over at segment 0.
        Segments are made (or remade at another size) only now, so records
        nobody could restore yet are never overwritten."""
        resized = False
        for fd in self._fds:
            if os.fstat(fd).st_size != self.segment_size:
                self._zero_fill(fd, self.segment_size)
                resized = True
        if resized:
            fsync_dir(self.directory)
        self.write_checkpoint(self.next_seq)
        self._current, self._offset = 0, 0
        self._seg_max = [-1] * self._seg_count

    def close(self) -> None:
        for fd in [*self._fds, self._checkpoint_fd]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds, self._checkpoint_fd = [], -1

    @staticmethod
    def _zero_fill(fd: int, size: int) -> None:
        # Written, not fallocate'd: later overwrites then change no metadata,
        # so fdatasync does not have to commit the file system's journal.
        os.ftruncate(fd, 0)
        for offset in range(0, size, len(_ZEROS)):
            write_all(fd, _ZEROS[: min(len(_ZEROS), size - offset)])
        os.fsync(fd)

    def _read_checkpoint(self) -> tuple[int, int]:
        return parse_checkpoint(os.pread(self._checkpoint_fd, 2 * _SLOT, 0))

    # --- the commit lane ------------------------------------------------------------
    def append(self, records: Sequence[bytes]) -> int:
        """Write as many of ``records`` (from ``encode``, numbered from
        ``next_seq`` on) as there is room for, flush, and return how many are
        now durable.  0 means the journal is full until ``retire`` catches up."""
        done = 0
        while done < len(records):
            fd = self._fds[self._current]
            room = self.segment_size - self._offset
            batch: list[bytes] = []
            size = 0
            for record in records[done:]:
                if size + len(record) > room:
                    break
                batch.append(record)
                size += len(record)
            if batch:
                os.pwritev(fd, batch, self._offset)
                os.fdatasync(fd)
                self._offset += size
                done += len(batch)
                self._seg_max[self._current] = self.next_seq + done - 1
                continue
            if len(records[done]) > self.segment_size:
                raise JournalError("record larger than a journal segment")
            following = (self._current + 1) % self._seg_count
            if self._seg_max[following] >= self.durable_low_water:
                break  # full: the next segment still holds records not yet retired
            self._current, self._offset = following, 0
            self._seg_max[following] = -1
        self.next_seq += done
        return done

    def fits(self, size: int) -> bool:
        """A record of ``size`` bytes may be journaled at all."""
        return size <= self.segment_size // 4

    # --- the retire lane ----------------------------------------------------------------
    def write_checkpoint(self, low_water: int) -> None:
        """Every record below ``low_water`` is in its Maildirs durably: say so,
        durably, in the older of the two slots (a torn write leaves the other)."""
        self._checkpoint_counter += 1
        head = _CHECKPOINT.pack(_CHECKPOINT_MAGIC, low_water, self._checkpoint_counter, 0)[:-4]
        slot = self._checkpoint_counter % 2
        os.pwrite(self._checkpoint_fd, head + struct.pack("<I", zlib.crc32(head)), slot * _SLOT)
        os.fdatasync(self._checkpoint_fd)
        self.durable_low_water = max(self.durable_low_water, low_water)
