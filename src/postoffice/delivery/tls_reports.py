"""Sending SMTP TLS reports (RFC 8460) for our outbound mail: the daily pass
(run by dmarc_reports.run_daily, the one report scheduler) and
``postoffice tlsrpt report [--now]``.

``TlsReportSender.run_once``, as the DMARC sender does:

1. seals the finished UTC days' counts into one report per policy domain
   (policy/tls_rpt_store.py ``seal_blocking``);
2. for each, looks up ``_smtp._tls.<policy domain>`` (§3): no usable
   record or no mailto: URI drops the report (with why); a DNS failure for
   the moment keeps it for the next pass, up to ``GIVE_UP`` after its period;
3. queues the report mail (policy/tls_rpt_report.py) from postmaster@<first
   local domain>, DKIM-signed with that domain's key like every notice of
   ours (§5.3 asks for a DKIM signature), under the queue id
   ``<report id>-tlsrpt`` (queued again after a crash, it replaces the copy);
4. marks the report sent.

https: reporting URIs (§5.2, POST) are not used: only mailto: ones.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from postoffice import logfmt
from postoffice.config.settings import Settings
from postoffice.delivery.dmarc_reports import lock_blocking, queue_report
from postoffice.delivery.outbound import Outbound, QueueHandoff
from postoffice.dns.resolver import DnsError, Resolver
from postoffice.mail.address import parse_mailbox
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.tls_rpt_report import (
    compressed,
    mail_destinations,
    report_json,
    report_message,
    reporting_uris,
)
from postoffice.policy.tls_rpt_store import (
    DAY,
    SealedReport,
    connect,
    finish_blocking,
    seal_blocking,
    sealed_blocking,
    store_path,
)

log = logging.getLogger("postoffice.tlsrpt")

GIVE_UP = 3 * DAY  # a domain whose record cannot be looked up this long after the period


@dataclass(frozen=True, slots=True)
class Sent:
    report_id: str
    domain: str
    state: str  # sent, dropped, waiting
    note: str


class TlsReportSender:
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

    async def run_once(self, now: float, *, today_too: bool = False) -> list[Sent]:
        """Seal what is due (finished days; ``today_too``: today so far) and
        send every sealed report."""
        path = store_path(self._settings.data_dir)
        lock = await asyncio.to_thread(lock_blocking, path.parent / "send.lock")
        try:
            db = await asyncio.to_thread(connect, path)
            try:
                await asyncio.to_thread(seal_blocking, db, now, today_too=today_too)
                return [
                    await self._send(db, report, now)
                    for report in await asyncio.to_thread(sealed_blocking, db)
                ]
            finally:
                db.close()
        finally:
            os.close(lock)

    async def _send(self, db: sqlite3.Connection, report: SealedReport, now: float) -> Sent:
        submitter = self._settings.hostname
        domain = self._settings.domains[0] if self._settings.domains else submitter
        sender = parse_mailbox(f"postmaster@{domain}")
        try:
            records = await self._resolver.txt(f"_smtp._tls.{report.domain}")
        except DnsError as exc:
            if exc.temporary and now < report.end + GIVE_UP:
                note = f"_smtp._tls.{report.domain} lookup failed for now: {exc}"
                log.info("tlsrpt: report %s waits: %s", report.report_id, note)
                return Sent(report.report_id, report.domain, "waiting", note)
            records = []
        to = mail_destinations(reporting_uris(records))
        note = ""
        if to:
            document = report_json(report, organization=submitter, contact=str(sender))
            data = report_message(
                report,
                submitter=submitter,
                sender=sender,
                to=to,
                attachment=compressed(document),
                now=now,
            )
            queue_id = await queue_report(
                self._queue, self._signer, sender, to, f"{report.report_id}-tlsrpt", data
            )
            note = f"queued {queue_id} to {', '.join(map(str, to))}"
        else:
            note = f"no v=TLSRPTv1 record with a mailto: rua at _smtp._tls.{report.domain}"
        state = "sent" if to else "dropped"
        await asyncio.to_thread(finish_blocking, db, report.report_id, state, note)
        log.info(
            "tlsrpt: report %s for %s %s: %s",
            report.report_id,
            logfmt.field(report.domain),
            state,
            logfmt.field(note),
        )
        return Sent(report.report_id, report.domain, state, note)


# --- the CLI ---------------------------------------------------------------------------------
def tlsrpt_report(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.delivery.queue.store import QueueStore
    from postoffice.dns.resolver import DnsResolver
    from postoffice.policy.dkim_keys import KeyStore

    store = QueueStore(settings.queue_dir, ThreadPoolExecutor(max_workers=1))
    store.ensure_dirs()
    sender = TlsReportSender(
        settings,
        DnsResolver(settings.relay.dns_servers),
        QueueHandoff(store),
        DkimSigner(KeyStore(settings.data_dir)),
    )
    done = asyncio.run(sender.run_once(time.time(), today_too=args.now))
    for item in done:
        print(f"{item.report_id}  {item.domain}  {item.state}  {item.note}")
    if not done:
        print("no TLS reports due" + ("" if args.now else " (--now: today's so far too)"))
    return 1 if any(item.state == "waiting" for item in done) else 0


def add_tlsrpt_parser(subparsers: Any) -> None:
    """Add ``tlsrpt report [--now]`` to the CLI's subcommands."""
    summary = "SMTP TLS reports (RFC 8460) on our outbound mail, for the domains that ask"
    group = subparsers.add_parser(
        "tlsrpt",
        help=summary,
        description=summary,
        epilog="examples:\n  postoffice tlsrpt report\n  postoffice tlsrpt report --now",
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
    parser.set_defaults(handler=tlsrpt_report)
