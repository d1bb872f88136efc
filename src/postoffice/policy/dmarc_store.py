"""What DMARC aggregate reports (RFC 7489 §7.2) are made of, kept durably.

Each message DMARC judged (pass or fail, for a domain whose record names a
``rua=mailto:``) is one row count in ``data_dir/dmarc/reports.sqlite3``,
aggregated per UTC day and policy domain by what a report row shows
(Appendix C ``record``): source IP, header From: and envelope domains, the
disposition applied, the aligned DKIM/SPF results, the raw results.

Written off the event loop: ``record`` puts the row on a bounded queue and
one thread per process writes what has queued in one transaction
(``synchronous=FULL``, WAL; every smtp process writes the same file, sqlite
serialises them).  A full queue drops the row (logged): reporting must never
slow or stop mail.

Bounded: at most ``MAX_ROWS`` distinct rows per domain and day, and
``MAX_DOMAINS`` domains per day.  Past the row cap a message still counts
(``overflow``) and the report says how many were not itemised, in
``report_metadata/error``; past the domain cap a new domain is not recorded
at all (logged).  A flood of forged mail with ever new source addresses thus
adds at most MAX_ROWS rows per domain and day.

A report is made in three steps so a crash neither loses nor duplicates one
(delivery/dmarc_reports.py): ``seal`` moves the open rows of finished days
(or of today too) into a report with its id, period and policy, in one
transaction; the sender queues the message under a queue id derived from
that report id, so doing it again after a crash replaces the queued copy;
then ``finish`` marks the report sent.  Only a crash after the copy was
queued *and delivered* but before ``finish`` sends it twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from postoffice import logfmt

log = logging.getLogger("postoffice.dmarc")

DAY = 86400  # RFC 7489 §7.2.1.1: the default reporting interval (ri=) is one day
MAX_ROWS = 1000  # distinct report rows per policy domain and day
MAX_DOMAINS = 5000  # policy domains per day
QUEUE_SIZE = 10000  # rows waiting for the writer thread (per process)
KEEP_SENT = 30 * DAY  # a sent report's bookkeeping is kept this long (then purged)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    day INTEGER NOT NULL, domain TEXT NOT NULL, report_id TEXT NOT NULL DEFAULT '',
    key TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, report_id, key));
CREATE TABLE IF NOT EXISTS domains (
    day INTEGER NOT NULL, domain TEXT NOT NULL, report_id TEXT NOT NULL DEFAULT '',
    published TEXT NOT NULL, rows INTEGER NOT NULL DEFAULT 0,
    overflow INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, domain, report_id));
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY, domain TEXT NOT NULL, begin INTEGER NOT NULL,
    end INTEGER NOT NULL, published TEXT NOT NULL, overflow INTEGER NOT NULL,
    state TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', changed REAL NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Published:
    """The record as seen (Appendix C ``policy_published``) and where reports go."""

    domain: str
    adkim: str
    aspf: str
    p: str
    sp: str
    pct: int
    fo: str
    rua: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps([self.domain, self.adkim, self.aspf, self.p, self.sp, self.pct, self.fo,
                           list(self.rua)])  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Published:
        d, adkim, aspf, p, sp, pct, fo, rua = json.loads(text)
        return cls(d, adkim, aspf, p, sp, int(pct), fo, tuple(rua))


@dataclass(frozen=True, slots=True)
class AuthResult:
    domain: str
    result: str
    selector: str = ""  # DKIM; for SPF: the scope, "mfrom" or "helo"


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One Appendix C ``record`` (without its count)."""

    source_ip: str
    header_from: str
    envelope_from: str
    disposition: str  # none, quarantine, reject
    dkim: str  # pass or fail: an aligned DKIM pass
    spf: str
    reasons: tuple[str, ...] = ()  # PolicyOverrideType: sampled_out, local_policy ...
    dkim_results: tuple[AuthResult, ...] = ()
    spf_results: tuple[AuthResult, ...] = ()

    def key(self) -> str:
        return json.dumps(
            [
                self.source_ip,
                self.header_from,
                self.envelope_from,
                self.disposition,
                self.dkim,
                self.spf,
                list(self.reasons),
                [[a.domain, a.result, a.selector] for a in self.dkim_results],
                [[a.domain, a.result, a.selector] for a in self.spf_results],
            ]
        )

    @classmethod
    def from_key(cls, key: str) -> ReportRow:
        ip, hfrom, efrom, disp, dkim, spf, reasons, dkims, spfs = json.loads(key)
        return cls(
            ip,
            hfrom,
            efrom,
            disp,
            dkim,
            spf,
            tuple(reasons),
            tuple(AuthResult(*a) for a in dkims),
            tuple(AuthResult(*a) for a in spfs),
        )


@dataclass(frozen=True, slots=True)
class SealedReport:
    report_id: str
    domain: str
    begin: int
    end: int
    published: Published
    overflow: int  # messages not itemised (over MAX_ROWS)
    rows: tuple[tuple[ReportRow, int], ...]


def store_path(data_dir: Path) -> Path:
    return data_dir / "dmarc" / "reports.sqlite3"


def connect(path: Path) -> sqlite3.Connection:
    return open_store(path, _SCHEMA)


def open_store(path: Path, schema: str) -> sqlite3.Connection:
    """A daily-report store (this one, TLS-RPT's): WAL, durable commits,
    shared by the processes that record and the one that reports."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (no upgrade deadlock between processes)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def add_blocking(
    db: sqlite3.Connection, day: int, published: Published, row: ReportRow, count: int = 1
) -> str:
    """Count ``row`` for ``published.domain`` on ``day`` (inside a transaction):
    "row", "overflow" (over MAX_ROWS) or "dropped" (over MAX_DOMAINS)."""
    domain = published.domain
    found = db.execute(
        "SELECT rows FROM domains WHERE day=? AND domain=? AND report_id=''", (day, domain)
    ).fetchone()
    if found is None:
        (domains,) = db.execute(
            "SELECT COUNT(*) FROM domains WHERE day=? AND report_id=''", (day,)
        ).fetchone()
        if domains >= MAX_DOMAINS:
            return "dropped"
        db.execute(
            "INSERT INTO domains (day, domain, published) VALUES (?, ?, ?)",
            (day, domain, published.to_json()),
        )
        rows = 0
    else:
        rows = found[0]
        # The record as last seen that day is the one reported.
        db.execute(
            "UPDATE domains SET published=? WHERE day=? AND domain=? AND report_id=''",
            (published.to_json(), day, domain),
        )
    key = row.key()
    updated = db.execute(
        "UPDATE rows SET count=count+? WHERE day=? AND domain=? AND report_id='' AND key=?",
        (count, day, domain, key),
    ).rowcount
    if updated:
        return "row"
    if rows >= MAX_ROWS:
        db.execute(
            "UPDATE domains SET overflow=overflow+? WHERE day=? AND domain=? AND report_id=''",
            (count, day, domain),
        )
        return "overflow"
    db.execute(
        "INSERT INTO rows (day, domain, key, count) VALUES (?, ?, ?, ?)", (day, domain, key, count)
    )
    db.execute(
        "UPDATE domains SET rows=rows+1 WHERE day=? AND domain=? AND report_id=''", (day, domain)
    )
    return "row"


def seal_blocking(db: sqlite3.Connection, now: float, *, today_too: bool = False) -> int:
    """Close the open rows of every finished UTC day (and, ``today_too``,
    of today so far) into one report per policy domain; returns how many."""
    today = int(now) // DAY
    last_day = today if today_too else today - 1
    sealed = 0
    with immediate(db):
        found = db.execute(
            "SELECT domain, MIN(day), MAX(day), SUM(overflow) FROM domains"
            " WHERE report_id='' AND day<=? GROUP BY domain",
            (last_day,),
        ).fetchall()
        for domain, first, last, overflow in found:
            (previous,) = db.execute(
                "SELECT MAX(end) FROM reports WHERE domain=?", (domain,)
            ).fetchone()
            begin = first * DAY
            if previous is not None and previous >= begin:
                begin = previous + 1  # an earlier `dmarc report --now` covered the start
            end = int(now) if last == today else (last + 1) * DAY - 1
            (published,) = db.execute(
                "SELECT published FROM domains WHERE domain=? AND report_id='' AND day=?",
                (domain, last),
            ).fetchone()
            report_id = f"{begin}{secrets.token_hex(6)}"  # also a queue id (records.QUEUE_ID)
            for table in ("rows", "domains"):
                db.execute(
                    f"UPDATE {table} SET report_id=? WHERE domain=? AND report_id='' AND day<=?",
                    (report_id, domain, last_day),
                )
            db.execute(
                "INSERT INTO reports (report_id, domain, begin, end, published, overflow, state,"
                " changed) VALUES (?, ?, ?, ?, ?, ?, 'sealed', ?)",
                (report_id, domain, begin, max(end, begin), published, overflow, now),
            )
            sealed += 1
    return sealed


def sealed_blocking(db: sqlite3.Connection) -> list[SealedReport]:
    """Every report sealed and not yet finished, with its rows."""
    out = []
    reports = db.execute(
        "SELECT report_id, domain, begin, end, published, overflow FROM reports"
        " WHERE state='sealed' ORDER BY begin, domain"
    ).fetchall()
    for report_id, domain, begin, end, published, overflow in reports:
        counts: dict[str, int] = {}
        for key, count in db.execute(
            "SELECT key, count FROM rows WHERE report_id=? ORDER BY key", (report_id,)
        ):
            counts[key] = counts.get(key, 0) + count  # the same row on several days
        rows = tuple((ReportRow.from_key(k), c) for k, c in counts.items())
        out.append(
            SealedReport(
                report_id, domain, begin, end, Published.from_json(published), overflow, rows
            )
        )
    return out


def finish_blocking(db: sqlite3.Connection, report_id: str, state: str, note: str) -> None:
    """``state``: "sent" or "dropped" (no destination took it; ``note`` says
    why).  Its rows go; the report's line stays KEEP_SENT for the next
    report's begin and for the admin."""
    now = time.time()
    with immediate(db):
        db.execute(
            "UPDATE reports SET state=?, note=?, changed=? WHERE report_id=?",
            (state, note, now, report_id),
        )
        db.execute("DELETE FROM rows WHERE report_id=?", (report_id,))
        db.execute("DELETE FROM domains WHERE report_id=?", (report_id,))
        db.execute("DELETE FROM reports WHERE state!='sealed' AND changed<?", (now - KEEP_SENT,))


class ReportRecorder:
    """The per-process writer: ``record`` never blocks; one thread writes."""

    def __init__(self, data_dir: Path) -> None:
        self._path = store_path(data_dir)
        self._queue: queue.Queue[tuple[int, Published, ReportRow] | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._dropped = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dmarc-store", daemon=True)
            self._thread.start()

    def record(self, published: Published, row: ReportRow, now: float | None = None) -> None:
        day = int(time.time() if now is None else now) // DAY
        try:
            self._queue.put_nowait((day, published, row))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("dmarc: report store behind, %d row(s) not recorded", self._dropped)

    def close(self) -> None:
        """Write what is queued, then stop (serve's shutdown)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        while True:
            batch = [self._queue.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            try:
                if items:
                    db = db or connect(self._path)
                    self._write(db, items)
            except (OSError, sqlite3.Error) as exc:
                log.error("dmarc: cannot record %d report row(s): %s", len(items), exc)
            if len(items) < len(batch):
                if db is not None:
                    db.close()
                return

    @staticmethod
    def _write(db: sqlite3.Connection, items: list[tuple[int, Published, ReportRow]]) -> None:
        with immediate(db):
            for day, published, row in items:
                if add_blocking(db, day, published, row) == "dropped":
                    log.warning(
                        "dmarc: over %d report domains today, not recorded: %s",
                        MAX_DOMAINS,
                        logfmt.field(published.domain),
                    )
