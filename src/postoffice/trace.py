"""``postoffice trace ID|ADDRESS [--since]``: a message's life, from the mail log and the queue.

The mail log (maillog.py) puts the queue id on every record of a message:
received (with the checks' verdicts), queued, each delivery attempt with the
remote reply, the bounce, the local mailbox file.  Retrieval records name
that file instead (a POP3/IMAP session knows files, not queue ids): trace
joins them through the ``stored`` record.  Delay and failure notices have
ids derived from the message's (``<id>-w``, ``<id>-b0``) and come along.

It reads ``[log] file`` and the older files logrotate leaves beside it
(``name.1``, ``name.2.gz``, ``name-20261205``, ``.gz`` or not), in either
``[log] format``, whatever the format was when each line was written; then
the queue, for what is still waiting and why.  Only records of the logger
``postoffice.mail`` are read: other lines (and lines that are not ours)
are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from postoffice import logfmt, maillog
from postoffice.config.settings import Settings
from postoffice.delivery.queue.records import QueueEntry
from postoffice.delivery.queue_cli import entry_lines, queue_store

# "<time> postoffice[<pid>]: <LEVEL> postoffice.mail: <message>" (logsetup.TEXT_FORMAT).
_TEXT_LINE = re.compile(
    r"^(?P<time>\S+) postoffice\[\d+\]: [A-Z]+ " + re.escape(maillog.LOGGER) + r": (?P<msg>.*)$"
)
# logrotate's names for older files: name.1, name.2.gz (the default), name-20261205 (dateext).
_ROTATED = re.compile(r"^\.(?P<n>\d+)(?:\.gz)?$|^-(?P<date>\d{8,10})(?:\.gz)?$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_WHAT = ("id", "event", "time")
_RECEIVING = frozenset(
    {maillog.CHECKS, maillog.RECEIVED, maillog.REJECTED}
)  # said by the line's layout, not repeated as fields


class TraceError(Exception):
    """``str()`` is the line users see."""


@dataclass(frozen=True)
class Record:
    time: datetime.datetime
    event: str
    fields: dict[str, str]  # addresses bare (a@b), lists joined with ","

    @property
    def queue_id(self) -> str:
        return self.fields.get("id", "")

    def addresses(self) -> set[str]:
        found = set()
        for key in (*maillog.ADDRESS_FIELDS, "user"):
            for one in self.fields.get(key, "").split(","):
                if "@" in one:
                    found.add(one.lower())
        return found


def log_files(path: Path) -> list[Path]:
    """``path`` and its rotated siblings, oldest first."""
    older: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            if not sibling.name.startswith(path.name):
                continue
            m = _ROTATED.match(sibling.name[len(path.name) :])
            if m is not None:
                # name.2 is older than name.1; name-20261204 older than name-20261205.
                age = int(m["n"]) if m["n"] is not None else -int(m["date"])
                older.append((age, sibling))
    files = [p for _, p in sorted(older, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def read_lines(path: Path) -> Iterator[str]:
    """The lines of one log file, read as they come (a year of logs never
    sits in memory), without their line ends."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as packed:
            yield from (line.rstrip("\n") for line in packed)
    else:
        with open(path, encoding="utf-8", errors="replace") as plain:
            yield from (line.rstrip("\n") for line in plain)


def parse_line(line: str) -> Record | None:
    """A mail log record from one line of either format; None for any other line."""
    line = line.rstrip("\n")
    if line.startswith("{"):
        return _from_json(line)
    m = _TEXT_LINE.match(line)
    if m is None:
        return None
    words, fields = logfmt.parse(m["msg"])
    if not words or words[0] not in maillog.EVENTS:
        return None
    moment = _moment(m["time"])
    if moment is None:
        return None
    for key in maillog.ADDRESS_FIELDS & fields.keys():
        fields[key] = ",".join(a.strip("<>") for a in fields[key].split(","))
    return Record(moment, words[0], fields)


def _from_json(line: str) -> Record | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("logger") != maillog.LOGGER:
        return None
    event, moment = obj.get("event"), _moment(str(obj.get("time", "")))
    if event not in maillog.EVENTS or moment is None:
        return None
    fields = {k: _flat(v) for k, v in obj.items() if k not in maillog.RESERVED}
    return Record(moment, str(event), fields)


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _moment(text: str) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.astimezone()


def since_time(text: str, now: datetime.datetime) -> datetime.datetime:
    """``--since``: a duration back from now (90s, 30m, 2h, 1d, 1w) or a time (ISO 8601)."""
    m = _DURATION.match(text.strip())
    if m:
        return now - datetime.timedelta(seconds=float(m[1]) * _UNIT_SECONDS[m[2]])
    moment = _moment(text.strip())
    if moment is None:
        raise TraceError(
            f"--since {text!r}: give a duration (90s, 30m, 2h, 1d) or a time (2026-12-05T14:00)"
        )
    return moment


def select(records: Callable[[], Iterable[Record]], wanted: str) -> list[Record]:
    """The records of the messages ``wanted`` names: a queue id, or an
    address (every message from or to it), with their notices and the
    retrievals of their mailbox files; message by message, in time order.

    ``records()`` reads the log afresh, oldest first: an address takes two
    passes (its messages' ids, then their records), and only the records
    chosen are kept, so memory follows the answer, not the log's size."""
    wanted = wanted.strip().strip("<>")
    if "@" in wanted:
        address = wanted.lower()
        ids = {r.queue_id for r in records() if r.queue_id and address in r.addresses()}
    else:
        ids = {wanted}

    def ours(queue_id: str) -> bool:  # the message's, or a notice about it
        return queue_id in ids or queue_id.partition("-")[0] in ids

    chosen: list[Record] = []
    # A mailbox file's message, from its "stored" record: the retrievals
    # that name the file come after it in the log.
    message_of: dict[str, str] = {}
    retrievals: list[Record] = []
    for r in records():
        if r.queue_id:
            if ours(r.queue_id):
                chosen.append(r)
                if r.event == maillog.STORED and "file" in r.fields:
                    message_of[r.fields["file"]] = r.queue_id
        elif r.fields.get("file") in message_of:
            retrievals.append(r)
    chosen += retrievals

    def root(r: Record) -> str:
        return (r.queue_id or message_of.get(r.fields.get("file", ""), "")).partition("-")[0]

    first: dict[str, datetime.datetime] = {}
    for r in chosen:
        first[root(r)] = min(first.get(root(r), r.time), r.time)

    def order(r: Record) -> tuple[datetime.datetime, str, int, datetime.datetime]:
        # Message by message; in each, what the session logs about receiving
        # it first: its "received" record follows the queue's commit, which
        # happens before the 250 is sent.
        return (first[root(r)], root(r), 0 if r.event in _RECEIVING else 1, r.time)

    return sorted(chosen, key=order)


def queued_now(settings: Settings, wanted: str) -> list[tuple[QueueEntry, int]]:
    wanted = wanted.strip().strip("<>").lower()
    found = []
    for entry, size in queue_store(settings).entries_blocking():
        env = entry.envelope
        if "@" in wanted:
            addresses = {str(a).lower() for a in (env.sender, *env.recipients) if a is not None}
            if wanted not in addresses:
                continue
        elif entry.queue_id.partition("-")[0] != wanted:
            continue
        found.append((entry, size))
    return found


def format_record(record: Record) -> str:
    moment = record.time.astimezone().isoformat(sep=" ", timespec="milliseconds")
    who = record.queue_id or f"({record.fields.get('protocol', '-')})"
    fields = " ".join(f"{k}={_shown(k, v)}" for k, v in record.fields.items() if k not in _WHAT)
    return f"{moment}  {who}  {record.event:<9}  {fields}"


def _shown(key: str, value: str) -> str:
    if key in maillog.ADDRESS_FIELDS:  # as the text log has them: <a@b>, <> the null sender
        return logfmt.paths(value.split(",")) if value else "<>"
    return logfmt.field(value)


def trace(settings: Settings, wanted: str, since: str | None, log: Path | None, out: TextIO) -> int:
    path = log or settings.log.file
    if path is None:
        raise TraceError(
            "[log] file is not set: trace reads the mail log from a file"
            " (set [log] file, or give one with --log)"
        )
    floor = since_time(since, datetime.datetime.now().astimezone()) if since else None
    files = log_files(path)

    def records() -> Iterator[Record]:
        return (r for r in _records(files) if floor is None or r.time >= floor)

    chosen = select(records, wanted)
    for record in chosen:
        print(format_record(record), file=out)
    waiting = queued_now(settings, wanted)
    if waiting:
        print("in the queue now:", file=out)
        for entry, size in waiting:
            for line in entry_lines(entry, size):
                print(f"  {line}", file=out)
    if not chosen and not waiting:
        print(
            f"postoffice: no record of {wanted} in {path} (or older files) nor in the queue",
            file=sys.stderr,
        )
        return 1
    return 0


def _records(paths: Iterable[Path]) -> Iterator[Record]:
    for path in paths:
        try:
            for line in read_lines(path):
                record = parse_line(line)
                if record is not None:
                    yield record
        except (OSError, EOFError) as exc:  # a truncated .gz, a file rotated away meanwhile
            print(f"postoffice: {path}: {exc}", file=sys.stderr)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return trace(settings, args.what, args.since, args.log, sys.stdout)
    except TraceError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 2
