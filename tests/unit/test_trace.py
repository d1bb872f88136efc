"""trace.py's readers: which files logrotate left, lines of both formats, --since."""

from __future__ import annotations

import datetime
import gzip
from pathlib import Path

import pytest

from postoffice.trace import TraceError, log_files, parse_line, read_lines, select, since_time

TEXT = (
    "2026-12-05T12:00:00.250+01:00 postoffice[7]: INFO postoffice.mail: deferred id=abc123"
    ' to=<bob@remote.test> relay=mx.remote.test[192.0.2.1]:25 reply="451 4.7.1 later"'
)
JSON = (
    '{"time":"2026-12-05T11:00:01.000+00:00","pid":7,"level":"INFO","logger":"postoffice.mail",'
    '"event":"received","id":"abc123","from":"","to":["bob@remote.test","c@d.test"],"size":5}'
)


def test_rotated_files_oldest_first(tmp_path: Path) -> None:
    for name in (
        "mail.log",
        "mail.log.1",
        "mail.log.2.gz",
        "mail.log.10.gz",
        "mail.log.bak",
        "mail.logx",
        "other.log.1",
    ):
        (tmp_path / name).write_bytes(b"")
    names = [p.name for p in log_files(tmp_path / "mail.log")]
    assert names == ["mail.log.10.gz", "mail.log.2.gz", "mail.log.1", "mail.log"]


def test_dateext_names_oldest_first(tmp_path: Path) -> None:
    for name in ("mail.log-20261204.gz", "mail.log-20261205", "mail.log-20261130.gz"):
        (tmp_path / name).write_bytes(b"")
    names = [p.name for p in log_files(tmp_path / "mail.log")]  # the live file is gone
    assert names == ["mail.log-20261130.gz", "mail.log-20261204.gz", "mail.log-20261205"]


def test_gzip_files_read_as_text(tmp_path: Path) -> None:
    path = tmp_path / "mail.log.2.gz"
    path.write_bytes(gzip.compress(f"{TEXT}\n{JSON}\n".encode()))
    assert list(read_lines(path)) == [TEXT, JSON]


def test_both_formats_parse_to_the_same_record_shape() -> None:
    text, js = parse_line(TEXT), parse_line(JSON)
    assert text is not None and js is not None
    assert text.event == "deferred" and text.queue_id == "abc123"
    assert text.fields["to"] == "bob@remote.test" and text.fields["reply"] == "451 4.7.1 later"
    assert js.event == "received" and js.fields["to"] == "bob@remote.test,c@d.test"
    assert js.fields["from"] == ""  # the null sender
    assert text.time < js.time  # 11:00:00.250 UTC, then 11:00:01 UTC: offsets compared
    assert js.addresses() == {"bob@remote.test", "c@d.test"}
    # Other lines are not mail events: skipped.
    assert (
        parse_line("2026-12-05T12:00:00.000+01:00 postoffice[7]: INFO postoffice: stopped") is None
    )
    assert parse_line('{"logger":"postoffice.smtp","msg":"x"}') is None
    assert parse_line("{not json") is None


def test_select_by_address_takes_whole_messages_in_order() -> None:
    records = [r for r in (parse_line(TEXT), parse_line(JSON)) if r is not None]
    assert [r.event for r in select(lambda: records, "<C@D.TEST>")] == ["received", "deferred"]
    assert select(lambda: records, "nobody@d.test") == []


def test_since() -> None:
    now = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=datetime.UTC)
    assert since_time("2h", now) == now - datetime.timedelta(hours=2)
    assert since_time("90s", now) == now - datetime.timedelta(seconds=90)
    assert since_time("2026-12-05T10:00+00:00", now).hour == 10
    with pytest.raises(TraceError, match="duration"):
        since_time("yesterday", now)
