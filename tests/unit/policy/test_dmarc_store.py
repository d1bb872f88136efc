"""The DMARC report store (policy/dmarc_store.py) on a real sqlite file: the
caps, sealing periods, and the report's XML (policy/dmarc_report.py)."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

from postoffice.policy import dmarc_store as ds
from postoffice.policy.dmarc_report import destinations, feedback_xml

NOON = 20_000 * ds.DAY + 43_200  # a UTC day's noon
PUB = ds.Published("sender.test", "r", "r", "none", "none", 100, "0", ("mailto:d@r.test",))


def row(ip: str, disposition: str = "none") -> ds.ReportRow:
    return ds.ReportRow(ip, "sender.test", "sender.test", disposition, "fail", "fail")


def add(db: sqlite3.Connection, r: ds.ReportRow, now: float = NOON, pub: ds.Published = PUB) -> str:
    with ds.immediate(db):
        return ds.add_blocking(db, int(now) // ds.DAY, pub, r)


def test_rows_past_the_cap_are_counted_not_itemised(tmp_path: Path) -> None:
    db = ds.connect(ds.store_path(tmp_path))
    with ds.immediate(db):
        for n in range(ds.MAX_ROWS):
            assert (
                ds.add_blocking(db, NOON // ds.DAY, PUB, row(f"10.0.{n // 256}.{n % 256}")) == "row"
            )
    assert add(db, row("192.0.2.1")) == "overflow"
    assert add(db, row("192.0.2.2")) == "overflow"
    assert add(db, row("10.0.0.0")) == "row"  # a known row still counts
    (stored,) = db.execute("SELECT COUNT(*) FROM rows").fetchone()
    assert stored == ds.MAX_ROWS  # the disk holds no more rows
    assert ds.seal_blocking(db, NOON + ds.DAY) == 1
    (report,) = ds.sealed_blocking(db)
    assert report.overflow == 2
    assert sum(c for _r, c in report.rows) == ds.MAX_ROWS + 1
    root = ET.fromstring(feedback_xml(report, org_name="mx.test", email_address="p@mx.test"))
    assert root.findtext("report_metadata/error") == "2 message(s) not itemised: over the row limit"


def test_domains_past_the_cap_are_not_recorded(tmp_path: Path) -> None:
    db = ds.connect(ds.store_path(tmp_path))
    with ds.immediate(db):
        for n in range(ds.MAX_DOMAINS):
            pub = ds.Published(f"d{n}.test", "r", "r", "none", "none", 100, "0", ())
            ds.add_blocking(db, NOON // ds.DAY, pub, row("192.0.2.1"))
    extra = ds.Published("late.test", "r", "r", "none", "none", 100, "0", ())
    assert add(db, row("192.0.2.1"), pub=extra) == "dropped"
    known = ds.Published("d1.test", "r", "r", "none", "none", 100, "0", ())
    assert add(db, row("192.0.2.2"), pub=known) == "row"  # a domain already seen today


def test_a_sealed_period_is_reported_once_and_the_next_begins_after_it(tmp_path: Path) -> None:
    db = ds.connect(ds.store_path(tmp_path))
    add(db, row("192.0.2.1"))
    assert ds.seal_blocking(db, NOON) == 0  # today is not finished
    assert ds.seal_blocking(db, NOON, today_too=True) == 1
    add(db, row("192.0.2.1"), NOON + 60)  # later the same day: a new open row
    (first,) = ds.sealed_blocking(db)
    assert (first.begin, first.end) == (NOON - 43_200, NOON)
    assert [c for _r, c in first.rows] == [1]
    ds.finish_blocking(db, first.report_id, "sent", "")
    assert ds.sealed_blocking(db) == []
    assert ds.seal_blocking(db, NOON + ds.DAY) == 1  # the day is over
    (second,) = ds.sealed_blocking(db)
    assert (second.begin, second.end) == (NOON + 1, NOON + 43_200 - 1)
    assert [c for _r, c in second.rows] == [1]


def test_rua_destinations_and_size_limits() -> None:
    found = destinations(
        ("mailto:a@r.test!10m", "mailto:b@r.test", "mailto:c@r.test!x", "mailto:bad")
    )
    assert [(str(d.address), d.max_size) for d in found] == [
        ("a@r.test", 10 << 20),
        ("b@r.test", None),
    ]
