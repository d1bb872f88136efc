"""What a restart would restore from a delivery journal, read without opening it.

Tests look at the journal's files (storage/journal.py) while the server runs
or after it was killed; ``Journal.open`` would create and change them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from postoffice.storage.journal import SEGMENTS, Record, parse_checkpoint, scan_segment


def pending_records(directory: Path, segments: int = SEGMENTS) -> list[Record]:
    """Read-only: the records a restart would restore, oldest first."""
    try:
        raw = (directory / "checkpoint").read_bytes()
    except FileNotFoundError:
        raw = b""
    low_water, _counter = parse_checkpoint(raw)
    records: list[Record] = []
    for i in range(segments):
        with contextlib.suppress(FileNotFoundError):
            records.extend(scan_segment((directory / f"segment-{i}").read_bytes(), low_water))
    return sorted(records, key=lambda r: r.seq)
