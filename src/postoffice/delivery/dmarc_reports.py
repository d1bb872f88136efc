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
server to deliver (or the next start).  The pass itself, shared with TLS
reports, is delivery/report_sending.py; this module says where a DMARC
report may go and what its mail is.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from postoffice.config.settings import Settings
from postoffice.delivery.report_sending import (
    DailyReportSender,
    Plan,
    ReportStore,
    add_report_parser,
    report_cli,
)
from postoffice.mail.address import Address
from postoffice.policy import dmarc_store
from postoffice.policy.dmarc_report import (
    Verification,
    destinations,
    feedback_xml,
    report_message,
    verified,
)
from postoffice.policy.dmarc_store import DAY, SealedReport
from postoffice.policy.report_mail import compressed

GIVE_UP = 3 * DAY  # a destination whose consent cannot be looked up this long after the period


class ReportSender(DailyReportSender[SealedReport]):
    kind = "dmarc"
    store = ReportStore(
        dmarc_store.store_path,
        dmarc_store.connect,
        dmarc_store.seal_blocking,
        dmarc_store.sealed_blocking,
        dmarc_store.finish_blocking,
    )
    log = logging.getLogger("postoffice.dmarc")

    async def plan(self, report: SealedReport, submitter: str, sender: Address, now: float) -> Plan:
        """The rua= destinations that consent (§7.1) and take the size (§6.2)."""
        xml = feedback_xml(report, org_name=submitter, email_address=str(sender))
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
            return Plan(note=note, waiting=True)
        data = b""
        if to:
            data = report_message(
                report, receiver=submitter, sender=sender, to=to, attachment=attachment, now=now
            )
        return Plan(to, data, note)


# --- the CLI ---------------------------------------------------------------------------------
def dmarc_report(args: argparse.Namespace, settings: Settings) -> int:
    return report_cli(ReportSender, args, settings, "DMARC reports")


def add_dmarc_parser(subparsers: Any) -> None:
    """Add ``dmarc report [--now]`` to the CLI's subcommands."""
    summary = "DMARC aggregate reports (RFC 7489 7.2) for the domains mail came from"
    add_report_parser(subparsers, "dmarc", summary, dmarc_report)
