"""What SMTP TLS reports (RFC 8460) are made of, kept durably.

Each outbound TLS decision (a new connection's STARTTLS outcome) is one
count in ``data_dir/tlsrpt/reports.sqlite3``, aggregated per UTC day (§4.1:
reports cover a UTC day), policy domain and policy (§4.4 ``policy``: its
type "sts", "tlsa" or "no-policy-found", its strings, its MX patterns):
successful and failed sessions (§4.4 ``summary``) and, per failure, the
§4.4 ``failure-details`` key (result type, our address, the MX's name and
address, the reason).  The recorder takes the policy as given, so the
couriers that apply MTA-STS or DANE record their own policy with it.

Recording is cheap on the hot path: ``record`` puts the item on a bounded
queue and one thread per process writes what has queued in one transaction
(WAL, ``synchronous=FULL``), as policy/dmarc_store.py does; a full queue
drops the item (logged): reporting never slows mail.  Bounded: at most
``MAX_DOMAINS`` policy domains per day; at most ``MAX_DETAILS`` itemised
failure keys per domain and day (past it a failure still counts in the
summary).  Domains are recorded whether or not they publish a TLSRPT
record: that is looked up once per report (``_smtp._tls.<domain>``), not
on every connection.

Sealing, sending and finishing follow dmarc_store's three steps, so a
crash neither loses nor (short of a crash between delivery and
``finish``) duplicates a report.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from postoffice import logfmt
from postoffice.policy.dmarc_store import immediate, open_store

log = logging.getLogger("postoffice.tlsrpt")

DAY = 86400  # RFC 8460 §4.1: a report covers a UTC day
MAX_DOMAINS = 5000  # policy domains per day
MAX_DETAILS = 100  # itemised failure-details keys per policy domain and day
QUEUE_SIZE = 10000  # results waiting for the writer thread (per process)
KEEP_SENT = 30 * DAY  # a sent report's line is kept this long (the next report's begin)

# §4.3 result types this server produces (the MTA-STS ones, sts-*, come with
# that policy).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
VALIDATION_FAILURE = "validation-failure"  # §4.3.1: a failure no other type names
TLSA_INVALID = "tlsa-invalid"  # §4.3.2.1: DANE: no TLSA record matched the certificate

SUCCESS = "+"  # the summary keys; a failure detail's key is its JSON
FAILURE = "-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (
    day INTEGER NOT NULL, domain TEXT NOT NULL, report_id TEXT NOT NULL DEFAULT '',
    policy TEXT NOT NULL, key TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, report_id, policy, key));
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY, domain TEXT NOT NULL, begin INTEGER NOT NULL,
    end INTEGER NOT NULL, state TEXT NOT NULL, note TEXT NOT NULL DEFAULT '',
    changed REAL NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """The policy a session was held to (§4.4 ``policy``)."""

    type: str  # "sts", "tlsa" or "no-policy-found"
    domain: str  # policy-domain: the recipient domain
    strings: tuple[str, ...] = ()  # policy-string: the STS policy's lines, the TLSA records
    mx_hosts: tuple[str, ...] = ()  # mx-host: the STS policy's mx: patterns

    @classmethod
    def none_found(cls, domain: str) -> TlsPolicy:
        return cls("no-policy-found", domain)

    def to_json(self) -> str:
        return json.dumps([self.type, self.domain, list(self.strings), list(self.mx_hosts)])

    @classmethod
    def from_json(cls, text: str) -> TlsPolicy:
        kind, domain, strings, mx_hosts = json.loads(text)
        return cls(kind, domain, tuple(strings), tuple(mx_hosts))


@dataclass(frozen=True, slots=True)
class TlsFailure:
    """One §4.4 ``failure-details`` entry (without its count)."""

    result_type: str  # §4.3
    sending_ip: str = ""  # sending-mta-ip
    mx_host: str = ""  # receiving-mx-hostname
    receiving_ip: str = ""  # receiving-ip
    reason: str = ""  # failure-reason-code

    def key(self) -> str:
        return json.dumps(
            [self.result_type, self.sending_ip, self.mx_host, self.receiving_ip, self.reason]
        )

    @classmethod
    def from_key(cls, key: str) -> TlsFailure:
        return cls(*json.loads(key))


@dataclass(frozen=True, slots=True)
class PolicyCounts:
    policy: TlsPolicy
    successes: int
    failures: int
    details: tuple[tuple[TlsFailure, int], ...]


@dataclass(frozen=True, slots=True)
class SealedReport:
    report_id: str
    domain: str
    begin: int
    end: int
    policies: tuple[PolicyCounts, ...]


def store_path(data_dir: Path) -> Path:
    return data_dir / "tlsrpt" / "reports.sqlite3"


def connect(path: Path) -> sqlite3.Connection:
    return open_store(path, _SCHEMA)


def _bump(db: sqlite3.Connection, day: int, domain: str, policy: str, key: str) -> bool:
    """Add one to an existing count; False when there is none yet."""
    return bool(
        db.execute(
            "UPDATE counts SET count=count+1 WHERE day=? AND domain=? AND report_id=''"
            " AND policy=? AND key=?",
            (day, domain, policy, key),
        ).rowcount
    )


def _insert(db: sqlite3.Connection, day: int, domain: str, policy: str, key: str) -> None:
    db.execute(
        "INSERT INTO counts (day, domain, policy, key, count) VALUES (?, ?, ?, ?, 1)",
        (day, domain, policy, key),
    )


def add_blocking(
    db: sqlite3.Connection, day: int, policy: TlsPolicy, failure: TlsFailure | None
) -> str:
    """Count one session (inside a transaction): "counted" or "dropped"
    (a new domain over MAX_DOMAINS)."""
    domain, text = policy.domain, policy.to_json()
    summary = SUCCESS if failure is None else FAILURE
    if not _bump(db, day, domain, text, summary):
        known = db.execute(
            "SELECT 1 FROM counts WHERE day=? AND domain=? AND report_id='' LIMIT 1", (day, domain)
        ).fetchone()
        if known is None:
            (domains,) = db.execute(
                "SELECT COUNT(DISTINCT domain) FROM counts WHERE day=? AND report_id=''", (day,)
            ).fetchone()
            if domains >= MAX_DOMAINS:
                return "dropped"
        _insert(db, day, domain, text, summary)
    if failure is not None and not _bump(db, day, domain, text, failure.key()):
        (details,) = db.execute(
            "SELECT COUNT(*) FROM counts WHERE day=? AND domain=? AND report_id=''"
            " AND key NOT IN (?, ?)",
            (day, domain, SUCCESS, FAILURE),
        ).fetchone()
        if details < MAX_DETAILS:
            _insert(db, day, domain, text, failure.key())
    return "counted"


def seal_blocking(db: sqlite3.Connection, now: float, *, today_too: bool = False) -> int:
    """Close the open counts of every finished UTC day (and, ``today_too``,
    of today so far) into one report per policy domain; returns how many."""
    today = int(now) // DAY
    last_day = today if today_too else today - 1
    sealed = 0
    with immediate(db):
        found = db.execute(
            "SELECT domain, MIN(day), MAX(day) FROM counts"
            " WHERE report_id='' AND day<=? GROUP BY domain",
            (last_day,),
        ).fetchall()
        for domain, first, last in found:
            (previous,) = db.execute(
                "SELECT MAX(end) FROM reports WHERE domain=?", (domain,)
            ).fetchone()
            begin = first * DAY
            if previous is not None and previous >= begin:
                begin = previous + 1  # an earlier `tlsrpt report --now` covered the start
            end = int(now) if last == today else (last + 1) * DAY - 1
            report_id = f"{begin}{secrets.token_hex(6)}"  # also a queue id (records.QUEUE_ID)
            db.execute(
                "UPDATE counts SET report_id=? WHERE domain=? AND report_id='' AND day<=?",
                (report_id, domain, last_day),
            )
            db.execute(
                "INSERT INTO reports (report_id, domain, begin, end, state, changed)"
                " VALUES (?, ?, ?, ?, 'sealed', ?)",
                (report_id, domain, begin, max(end, begin), now),
            )
            sealed += 1
    return sealed


def sealed_blocking(db: sqlite3.Connection) -> list[SealedReport]:
    """Every report sealed and not yet finished, with its counts per policy."""
    out = []
    reports = db.execute(
        "SELECT report_id, domain, begin, end FROM reports WHERE state='sealed'"
        " ORDER BY begin, domain"
    ).fetchall()
    for report_id, domain, begin, end in reports:
        per_policy: dict[str, dict[str, int]] = {}
        for policy, key, count in db.execute(
            "SELECT policy, key, count FROM counts WHERE report_id=? ORDER BY policy, key",
            (report_id,),
        ):
            keys = per_policy.setdefault(policy, {})
            keys[key] = keys.get(key, 0) + count  # the same key on several days
        policies = tuple(
            PolicyCounts(
                TlsPolicy.from_json(policy),
                keys.pop(SUCCESS, 0),
                keys.pop(FAILURE, 0),
                tuple((TlsFailure.from_key(k), c) for k, c in keys.items()),
            )
            for policy, keys in per_policy.items()
        )
        out.append(SealedReport(report_id, domain, begin, end, policies))
    return out


def finish_blocking(db: sqlite3.Connection, report_id: str, state: str, note: str) -> None:
    """``state``: "sent" or "dropped" (``note`` says why); its counts go."""
    now = time.time()
    with immediate(db):
        db.execute(
            "UPDATE reports SET state=?, note=?, changed=? WHERE report_id=?",
            (state, note, now, report_id),
        )
        db.execute("DELETE FROM counts WHERE report_id=?", (report_id,))
        db.execute("DELETE FROM reports WHERE state!='sealed' AND changed<?", (now - KEEP_SENT,))


class TlsReportRecorder:
    """The per-process writer: ``record`` never blocks; one thread writes."""

    def __init__(self, data_dir: Path) -> None:
        self._path = store_path(data_dir)
        self._queue: queue.Queue[tuple[int, TlsPolicy, TlsFailure | None] | None] = queue.Queue(
            QUEUE_SIZE
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dropped = 0

    def record(
        self, policy: TlsPolicy, failure: TlsFailure | None = None, now: float | None = None
    ) -> None:
        """One session held to ``policy``: successful (``failure`` None) or not."""
        if self._thread is None:
            self._start()
        day = int(time.time() if now is None else now) // DAY
        try:
            self._queue.put_nowait((day, policy, failure))
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("tlsrpt: report store behind, %d result(s) not recorded", self._dropped)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tlsrpt-store", daemon=True)
                self._thread.start()

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
                    with immediate(db):
                        for day, policy, failure in items:
                            if add_blocking(db, day, policy, failure) == "dropped":
                                log.warning(
                                    "tlsrpt: over %d policy domains today, not recorded: %s",
                                    MAX_DOMAINS,
                                    logfmt.field(policy.domain),
                                )
            except (OSError, sqlite3.Error) as exc:
                log.error("tlsrpt: cannot record %d session result(s): %s", len(items), exc)
            if len(items) < len(batch):
                if db is not None:
                    db.close()
                return
