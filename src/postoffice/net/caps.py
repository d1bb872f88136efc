"""The smtp listener's connection caps, held across all smtp processes.

``[limits] max_connections`` and ``max_connections_per_ip`` (by
``policy.clients.client_key``: an IPv4 address or an IPv6 /64) bound what
one listener holds.  With several smtp processes (``[limits]
smtp_processes``, workers.py) each process counting only its own
connections would let a client hold N times its share, so the smtp
processes count in one table they all map (``SharedCaps``,
``data_dir/smtp-caps``, made by the server next to ``smtp-shares``).

The table.  A header (processes P, slots K, a random salt), then P totals,
then K slots of ``key hash, count of process 0 .. count of process P-1``:
one column per process, so each process adds and takes away only in its
own column, and the server can give back everything a dead process held
(``release_process``) without knowing which clients it served.  A client
key is found by its salted 63-bit BLAKE2b hash (salted so no one can pick
addresses that collide with a victim's) with linear probing; a slot whose
counts all reach zero is removed by shifting back the slots after it (Knuth
6.4, Algorithm R), so lookups stay short with no tombstones.  K is at least
twice ``max_connections`` (every held connection's key fits, half empty).

Every check-and-count and every release happens under ``flock`` on the
table's file: two processes cannot both take the last slot of an address.
A process killed (``kill -9``) in the middle is let go by the kernel, lock
included; its column is zeroed by the server before it starts the
successor (workers.py), and the table rebuilt (a slot copied by a shift
cut short is a duplicate: the copy found first from the key's home slot is
the live one, the other is dropped).

What it costs: two ``flock`` calls and one hash per accepted connection and
per closed one, a few microseconds, in each process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

CAPS_FILE = "smtp-caps"  # in data_dir, beside net/accept.SHARES_FILE
MIN_SLOTS = 4096
_HEADER = struct.Struct("=qq16s")  # processes, slots, salt
_INT = struct.Struct("=q")


def slots_for(max_connections: int) -> int:
    """Table size for ``max_connections``: a power of two, at least twice it."""
    slots = MIN_SLOTS
    while slots < 2 * max_connections:
        slots *= 2
    return slots


class SharedCaps:
    """One process's view (column ``index``) of the smtp processes' table."""

    def __init__(self, path: Path, index: int) -> None:
        self.index = index
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            header = os.pread(self._fd, _HEADER.size, 0)
            self.processes, self.slots, self._salt = _HEADER.unpack(header)
            if not 0 <= index < self.processes:
                raise ValueError(f"{path}: no column {index} among {self.processes}")
            self._slot_size = _INT.size * (1 + self.processes)
            self._row = struct.Struct(f"={1 + self.processes}q")
            self._table = _HEADER.size + _INT.size * self.processes
            self._map = mmap.mmap(self._fd, self._table + self._slot_size * self.slots)
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(cls, data_dir: Path, processes: int, max_connections: int) -> SharedCaps:
        """The server's (column 0) view of a new, empty table."""
        path = data_dir / CAPS_FILE
        slots = slots_for(max_connections)
        size = _HEADER.size + _INT.size * processes + _INT.size * (1 + processes) * slots
        # As for smtp-shares: a new file put in place, never one truncated
        # under a running server's map.  Sparse: only pages used take memory.
        fresh = data_dir / f".{CAPS_FILE}.{os.getpid()}"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, _HEADER.pack(processes, slots, os.urandom(16)), 0)
        finally:
            os.close(fd)
        os.replace(fresh, path)
        return cls(path, 0)

    @classmethod
    def open(cls, data_dir: Path, index: int) -> SharedCaps:
        """An extra smtp process's view (the server made the table)."""
        return cls(data_dir / CAPS_FILE, index)

    # --- the table --------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _hash(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode(), digest_size=8, key=self._salt).digest()
        # 63 bits (the slots are signed), never 0: 0 marks an empty slot.
        return (int.from_bytes(digest, "little") >> 1) or 1

    def _read(self, slot: int) -> tuple[int, ...]:
        return self._row.unpack_from(self._map, self._table + slot * self._slot_size)

    def _write(self, slot: int, row: tuple[int, ...]) -> None:
        self._row.pack_into(self._map, self._table + slot * self._slot_size, *row)

    def _find(self, hashed: int) -> tuple[int, bool]:
        """The slot holding ``hashed`` (True), or the empty one to put it in
        (False); (-1, False) when the table is full."""
        slot = hashed % self.slots
        for _ in range(self.slots):
            key = _INT.unpack_from(self._map, self._table + slot * self._slot_size)[0]
            if key == hashed:
                return slot, True
            if key == 0:
                return slot, False
            slot = (slot + 1) % self.slots
        return -1, False

    def _remove(self, slot: int) -> None:
        """Empty ``slot``, moving back the slots after it that would no longer
        be found from their home slot (Knuth 6.4, Algorithm R)."""
        hole, probe = slot, slot
        while True:
            probe = (probe + 1) % self.slots
            row = self._read(probe)
            if row[0] == 0:
                break
            home = row[0] % self.slots
            # Stays if its home lies cyclically in (hole, probe].
            if (hole < home <= probe) if hole <= probe else (home > hole or home <= probe):
                continue
            self._write(hole, row)
            hole = probe
        self._write(hole, (0,) * (1 + self.processes))

    def _total_at(self, index: int) -> int:
        return int(_INT.unpack_from(self._map, _HEADER.size + index * _INT.size)[0])

    def _set_total(self, index: int, value: int) -> None:
        _INT.pack_into(self._map, _HEADER.size + index * _INT.size, value)

    # --- what a listener asks -----------------------------------------------------------
    def admit(self, key: str, max_total: int, max_per_key: int) -> bool:
        """Count one more connection from ``key`` in this process's column,
        unless all the processes together would then pass a cap."""
        hashed = self._hash(key)
        with self._locked():
            if sum(self._total_at(i) for i in range(self.processes)) >= max_total:
                return False
            slot, found = self._find(hashed)
            if slot < 0:
                return False  # full: only if max_connections grew past the table
            row = list(self._read(slot)) if found else [hashed] + [0] * self.processes
            if sum(row[1:]) >= max_per_key:
                return False
            row[1 + self.index] += 1
            self._write(slot, tuple(row))
            self._set_total(self.index, self._total_at(self.index) + 1)
            return True

    def release(self, key: str) -> None:
        """Give back one connection from ``key`` that this process counted."""
        hashed = self._hash(key)
        with self._locked():
            self._set_total(self.index, max(0, self._total_at(self.index) - 1))
            slot, found = self._find(hashed)
            if not found:
                return  # its column was cleared meanwhile (not for a live process)
            row = list(self._read(slot))
            row[1 + self.index] = max(0, row[1 + self.index] - 1)
            if sum(row[1:]) == 0:
                self._remove(slot)
            else:
                self._write(slot, tuple(row))

    def release_process(self, index: int) -> None:
        """Process ``index`` is gone: give back everything it held, and rebuild
        the table (it may have died in the middle of a change)."""
        with self._locked():
            self._set_total(index, 0)
            # Each key's live copy: the one ``_find`` reaches first from its
            # home slot, which every admit and release since has changed.  A
            # second copy (a shift cut short) is stale and may hold a larger
            # count: merging by the larger would leak it for good.
            live: dict[int, list[int]] = {}
            for slot in range(self.slots):
                hashed = self._read(slot)[0]
                if hashed == 0 or hashed in live:
                    continue
                first, _found = self._find(hashed)
                counts = list(self._read(first)[1:])
                counts[index] = 0
                live[hashed] = counts
            empty = (0,) * (1 + self.processes)
            for slot in range(self.slots):
                self._write(slot, empty)
            for hashed, counts in live.items():
                if any(counts):
                    slot, _found = self._find(hashed)
                    self._write(slot, (hashed, *counts))

    def held(self, key: str | None = None) -> int:
        """Connections all processes hold (from ``key`` only, if given)."""
        with self._locked():
            if key is None:
                return sum(self._total_at(i) for i in range(self.processes))
            slot, found = self._find(self._hash(key))
            return sum(self._read(slot)[1:]) if found else 0

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
