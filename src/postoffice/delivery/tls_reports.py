"""Sending SMTP TLS reports (RFC 8460) for our outbound mail: the daily pass
(delivery/report_sending.py, shared with DMARC's, run by its ``run_daily``) and
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
from postoffice.dns.resolver import DnsError
from postoffice.mail.address import Address
from postoffice.policy import tls_rpt_store
from postoffice.policy.report_mail import compressed
from postoffice.policy.tls_rpt_report import (
    mail_destinations,
    report_json,
    report_message,
    reporting_uris,
)
from postoffice.policy.tls_rpt_store import DAY, SealedReport

GIVE_UP = 3 * DAY  # a domain whose record cannot be looked up this long after the period


class TlsReportSender(DailyReportSender[SealedReport]):
    kind = "tlsrpt"
    store = ReportStore(
        tls_rpt_store.store_path,
        tls_rpt_store.connect,
        tls_rpt_store.seal_blocking,
        tls_rpt_store.sealed_blocking,
        tls_rpt_store.finish_blocking,
    )
    log = logging.getLogger("postoffice.tlsrpt")

    async def plan(self, report: SealedReport, submitter: str, sender: Address, now: float) -> Plan:
        """The mailto: rua of ``_smtp._tls.<policy domain>`` (§3)."""
        try:
            records = await self._resolver.txt(f"_smtp._tls.{report.domain}")
        except DnsError as exc:
            if exc.temporary and now < report.end + GIVE_UP:
                note = f"_smtp._tls.{report.domain} lookup failed for now: {exc}"
                return Plan(note=note, waiting=True)
            records = []
        to = mail_destinations(reporting_uris(records))
        if not to:
            note = f"no v=TLSRPTv1 record with a mailto: rua at _smtp._tls.{report.domain}"
            return Plan(note=note)
        document = report_json(report, organization=submitter, contact=str(sender))
        data = report_message(
            report,
            submitter=submitter,
            sender=sender,
            to=to,
            attachment=compressed(document),
            now=now,
        )
        return Plan(to, data)


# --- the CLI ---------------------------------------------------------------------------------
def tlsrpt_report(args: argparse.Namespace, settings: Settings) -> int:
    return report_cli(TlsReportSender, args, settings, "TLS reports")


def add_tlsrpt_parser(subparsers: Any) -> None:
    """Add ``tlsrpt report [--now]`` to the CLI's subcommands."""
    summary = "SMTP TLS reports (RFC 8460) on our outbound mail, for the domains that ask"
    add_report_parser(subparsers, "tlsrpt", summary, tlsrpt_report)
