"""Sending DMARC aggregate reports (RFC 7489 §7.2): the daily task of the
delivering process and ``postoffice dmarc report [--now]``.

Once a day, just after the UTC day boundary (§7.2.1.1: the default interval
``ri=86400``; the reporting period is the UTC day), and at start-up for
anything a stopped or crashed server left behind, ``ReportSender.run_once``:

1. seals the finished days' rows into one report per policy domain
   (policy/dmarc_store.py ``seal_blocking``, one transaction);
2. for each sealed report, checks its rua= destinations: external ones need
   the ``_report._dmarc`` consent record (§7.1; a DNS failure for the moment
   keeps the report for the next pass, for up to ``GIVE_UP`` after its
   period), and a report larger than a destination's ``!size`` is not sent
   there (§6.2);
3. queues the report mail (policy/dmarc_report.py) from postmaster@<first
   local domain>, DKIM-signed with that domain's key like DSNs
   (outbound.py ``_send_dsn``), under the queue id ``<report id>-dmarc``:
   queued again after a crash, it replaces the copy still queued;
4. marks the report sent (or dropped, with why).

Only one pass runs at a time (a lock file), whoever runs it: the server's
task or the CLI, which queues through ``QueueHandoff`` for the running
server to deliver (or the next start).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postoffice import logfmt
from postoffice.config.settings import Settings
from postoffice.delivery.outbound import Outbound, QueueHandoff
from postoffice.dns.resolver import Resolver
from postoffice.mail.address import Address, parse_mailbox
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.dmarc_report import (
    Verification,
    compressed,
    destinations,
    feedback_xml,
    report_message,
    verified,
)
from postoffice.policy.dmarc_store import (
    DAY,
    SealedReport,
    connect,
    finish_blocking,
    seal_blocking,
    sealed_blocking,
    store_path,
)

log = logging.getLogger("postoffice.dmarc")

GIVE_UP = 3 * DAY  # a destination whose consent cannot be looked up this long after the period
AFTER_MIDNIGHT = 300.0  # seconds past 00:00 UTC the daily pass runs (late mail of the day is in)


@dataclass(frozen=True, slots=True)
class Sent:
    report_id: str
    domain: str
    state: str  # sent, dropped, waiting
    note: str


class ReportSender:
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

    async def run_once(self, now: float, *, today_too: bool = False) -> list[Sent]:
        """Seal what is due (finished days; ``today_too``: today so far) and
        send every sealed report."""
        path = store_path(self._settings.data_dir)
        lock = await asyncio.to_thread(lock_blocking, path.parent / "send.lock")
        try:
            db = await asyncio.to_thread(connect, path)
            try:
                await asyncio.to_thread(seal_blocking, db, now, today_too=today_too)
                out = []
                for report in await asyncio.to_thread(sealed_blocking, db):
                    out.append(await self._send(db, report, now))
                return out
            finally:
                db.close()
        finally:
            os.close(lock)

    async def _send(self, db: sqlite3.Connection, report: SealedReport, now: float) -> Sent:
        receiver = self._settings.hostname
        domain = self._settings.domains[0] if self._settings.domains else receiver
        sender = parse_mailbox(f"postmaster@{domain}")
        xml = feedback_xml(report, org_name=receiver, email_address=str(sender))
        attachment = compressed(xml)
        to: list[Address] = []
        notes: list[str] = []
        waiting = False
        for dest in destinations(report.published.rua):
            check = await verified(self._resolver, report.domain, dest.address.domain)
            if check is Verification.TEMPORARY and now < report.end + GIVE_UP:
                waiting = True
                notes.append(f"{dest.address}: consent lookup failed for now")
            elif check is not Verification.OK:
                notes.append(f"{dest.address}: no {report.domain}._report._dmarc record (7.1)")
            elif dest.max_size is not None and len(attachment) > dest.max_size:
                notes.append(f"{dest.address}: report over its size limit {dest.max_size}")
            elif dest.address not in to:
                to.append(dest.address)
        note = "; ".join(notes)
        if waiting:
            log.info("dmarc: report %s for %s waits: %s", report.report_id, report.domain, note)
            return Sent(report.report_id, report.domain, "waiting", note)
        if to:
            data = report_message(
                report, receiver=receiver, sender=sender, to=to, attachment=attachment, now=now
            )
            queue_id = await queue_report(
                self._queue, self._signer, sender, to, f"{report.report_id}-dmarc", data
            )
            note = f"queued {queue_id} to {', '.join(map(str, to))}" + (f"; {note}" if note else "")
        state = "sent" if to else "dropped"
        await asyncio.to_thread(finish_blocking, db, report.report_id, state, note)
        log.info(
            "dmarc: report %s for %s %s: %s",
            report.report_id,
            logfmt.field(report.domain),
            state,
            logfmt.field(note or "no destination"),
        )
        return Sent(report.report_id, report.domain, state, note)


async def run_daily(passes: Sequence[tuple[str, Callable[[float], Awaitable[object]]]]) -> None:
    """The one daily task for every report kind (DMARC here, TLS-RPT in
    tls_reports.py): each pass now (what was left behind), then after each
    UTC day boundary."""
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
def dmarc_report(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.delivery.queue.store import QueueStore
    from postoffice.dns.resolver import DnsResolver
    from postoffice.policy.dkim_keys import KeyStore

    store = QueueStore(settings.queue_dir, ThreadPoolExecutor(max_workers=1))
    store.ensure_dirs()
    sender = ReportSender(
        settings,
        DnsResolver(settings.relay.dns_servers),
        QueueHandoff(store),
        DkimSigner(KeyStore(settings.data_dir)),
    )
    done = asyncio.run(sender.run_once(time.time(), today_too=args.now))
    for item in done:
        print(f"{item.report_id}  {item.domain}  {item.state}  {item.note}")
    if not done:
        print("no DMARC reports due" + ("" if args.now else " (--now: today's so far too)"))
    return 1 if any(item.state == "waiting" for item in done) else 0


def add_dmarc_parser(subparsers: Any) -> None:
    """Add ``dmarc report [--now]`` to the CLI's subcommands."""
    summary = "DMARC aggregate reports (RFC 7489 7.2) for the domains mail came from"
    group = subparsers.add_parser(
        "dmarc",
        help=summary,
        description=summary,
        epilog="examples:\n  postoffice dmarc report\n  postoffice dmarc report --now",
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
    parser.set_defaults(handler=dmarc_report)
