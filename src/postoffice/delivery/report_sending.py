"""The daily pass every aggregate report kind shares: DMARC (dmarc_reports.py)
and SMTP TLS reports (tls_reports.py) differ only in where a report may go
and what its mail says, so the rest lives here once.

``DailyReportSender.run_once`` takes the kind's lock file (one pass at a
time, whoever runs it: the server's task or the CLI), seals the finished
UTC days in the kind's store (``ReportStore``), and for each sealed report
asks the kind for a ``Plan`` (destinations, a note, or "wait": a DNS
failure for the moment), queues the mail from postmaster@<first local
domain>, DKIM-signed like our DSNs, under ``<report id>-<kind>`` (queued
again after a crash, it replaces the copy still queued), and marks the
report sent or dropped.  ``run_daily`` is the one scheduler; ``report_cli``
and ``add_report_parser`` make ``postoffice <kind> report [--now]``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from postoffice import logfmt
from postoffice.config.settings import Settings
from postoffice.delivery.outbound import Outbound, QueueHandoff
from postoffice.dns.resolver import Resolver
from postoffice.mail.address import Address, parse_mailbox
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.dmarc_store import DAY

log = logging.getLogger("postoffice.reports")

AFTER_MIDNIGHT = 300.0  # seconds past 00:00 UTC the daily pass runs (late mail of the day is in)


class Sealed(Protocol):
    """What the pass needs of a sealed report, whatever its kind."""

    @property
    def report_id(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def end(self) -> int: ...


R = TypeVar("R", bound=Sealed)


@dataclass(frozen=True, slots=True)
class ReportStore(Generic[R]):
    """A kind's store (policy/dmarc_store.py, policy/tls_rpt_store.py): the
    same five blocking functions over its own tables."""

    path: Callable[[Path], Path]
    connect: Callable[[Path], sqlite3.Connection]
    seal: Callable[..., int]  # (db, now, *, today_too)
    sealed: Callable[[sqlite3.Connection], list[R]]
    finish: Callable[[sqlite3.Connection, str, str, str], None]


@dataclass(frozen=True, slots=True)
class Sent:
    report_id: str
    domain: str
    state: str  # sent, dropped, waiting
    note: str


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one report goes: ``to`` with the mail ``data`` (empty ``to``:
    dropped), ``note`` saying why not elsewhere; ``waiting``: ask again at
    the next pass."""

    to: list[Address] = field(default_factory=list)
    data: bytes = b""
    note: str = ""
    waiting: bool = False


class DailyReportSender(Generic[R]):
    """One report kind's pass; subclasses say where a report goes (``plan``)."""

    kind = ""  # "dmarc", "tlsrpt": the queue id suffix and the log prefix
    store: ReportStore[R]
    log = log

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver,
        queue: Outbound | QueueHandoff,
        signer: DkimSigner | None,
    ) -> None:
        self._settings = settings
        self._resolver = resolver
        self._queue = queue
        self._signer = signer

    def reconfigure(self, settings: Settings) -> None:
        self._settings = settings

    async def plan(self, report: R, submitter: str, sender: Address, now: float) -> Plan:
        raise NotImplementedError

    async def run_once(self, now: float, *, today_too: bool = False) -> list[Sent]:
        """Seal what is due (finished days; ``today_too``: today so far) and
        send every sealed report."""
        store = self.store
        path = store.path(self._settings.data_dir)
        lock = await asyncio.to_thread(lock_blocking, path.parent / "send.lock")
        try:
            db = await asyncio.to_thread(store.connect, path)
            try:
                await asyncio.to_thread(store.seal, db, now, today_too=today_too)
                return [
                    await self._send(db, report, now)
                    for report in await asyncio.to_thread(store.sealed, db)
                ]
            finally:
                db.close()
        finally:
            os.close(lock)

    async def _send(self, db: sqlite3.Connection, report: R, now: float) -> Sent:
        submitter = self._settings.hostname
        domain = self._settings.domains[0] if self._settings.domains else submitter
        sender = parse_mailbox(f"postmaster@{domain}")
        plan = await self.plan(report, submitter, sender, now)
        note = plan.note
        if plan.waiting:
            self.log.info(
                "%s: report %s for %s waits: %s", self.kind, report.report_id, report.domain, note
            )
            return Sent(report.report_id, report.domain, "waiting", note)
        to = plan.to
        if to:
            queue_id = await queue_report(
                self._queue, self._signer, sender, to, f"{report.report_id}-{self.kind}", plan.data
            )
            note = f"queued {queue_id} to {', '.join(map(str, to))}" + (f"; {note}" if note else "")
        state = "sent" if to else "dropped"
        await asyncio.to_thread(self.store.finish, db, report.report_id, state, note)
        self.log.info(
            "%s: report %s for %s %s: %s",
            self.kind,
            report.report_id,
            logfmt.field(report.domain),
            state,
            logfmt.field(note or "no destination"),
        )
        return Sent(report.report_id, report.domain, state, note)


async def run_daily(passes: Sequence[tuple[str, Callable[[float], Awaitable[object]]]]) -> None:
    """The one daily task for every report kind: each pass now (what was
    left behind), then after each UTC day boundary."""
    while True:
        for name, run_once in passes:
            try:
                await run_once(time.time())
            except Exception:  # reports must never take the server down
                log.exception("%s: report pass failed", name)
        now = time.time()
        await asyncio.sleep((now // DAY + 1) * DAY + AFTER_MIDNIGHT - now)


async def queue_report(
    queue: Outbound | QueueHandoff,
    signer: DkimSigner | None,
    sender: Address,
    to: list[Address],
    queue_id: str,
    data: bytes,
) -> str:
    """Queue a report mail under ``queue_id``, DKIM-signed like our DSNs."""
    writer = queue.writer(sender, to, queue_id=queue_id)
    try:
        if signer is None:
            await writer.write(data)
            return await writer.commit()
        return await writer.commit_with_head(data, signer.sign_blocking)
    except BaseException:
        await writer.discard()
        raise


def lock_blocking(path: Path) -> int:
    """The one-pass-at-a-time lock of a report kind (held until the fd closes)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# --- the CLI ---------------------------------------------------------------------------------
def report_cli(
    kind: type[DailyReportSender[Any]], args: argparse.Namespace, settings: Settings, what: str
) -> int:
    """``postoffice <kind> report [--now]``: one pass, queued for the running
    server (or the next start) through ``QueueHandoff``; 1 if any report waits."""
    from postoffice.cluster.stores import open_signing_keys
    from postoffice.delivery.queue.store import QueueStore
    from postoffice.dns.resolver import DnsResolver

    store = QueueStore(settings.queue_dir, ThreadPoolExecutor(max_workers=1))
    store.ensure_dirs()
    sender = kind(
        settings,
        DnsResolver(settings.relay.dns_servers),
        QueueHandoff(store),
        DkimSigner(open_signing_keys(settings, follow=False)),
    )
    done = asyncio.run(sender.run_once(time.time(), today_too=args.now))
    for item in done:
        print(f"{item.report_id}  {item.domain}  {item.state}  {item.note}")
    if not done:
        print(f"no {what} due" + ("" if args.now else " (--now: today's so far too)"))
    return 1 if any(item.state == "waiting" for item in done) else 0


def add_report_parser(
    subparsers: Any,
    name: str,
    summary: str,
    handler: Callable[[argparse.Namespace, Settings], int],
) -> None:
    """Add ``<name> report [--now]`` to the CLI's subcommands."""
    group = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"examples:\n  postoffice {name} report\n  postoffice {name} report --now",
    )
    group.set_defaults(handler=None, help_parser=group)
    commands = group.add_subparsers(title="commands", metavar="COMMAND")
    text = (
        "queue the reports of finished UTC days now (the server does this daily);"
        " --now: today's so far too"
    )
    parser = commands.add_parser("report", help=text, description=text)
    parser.add_argument(
        "--now", action="store_true", help="also report today so far (tests, before a move)"
    )
    parser.set_defaults(handler=handler)
