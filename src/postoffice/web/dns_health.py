"""/admin/dns: what ``postoffice doctor`` says of a domain, with the records to copy.

DKIM keys are made and rotated here too, where the config keeps them
(cluster/stores.py: data_dir/dkim/, or the [cluster] database) as
``postoffice dkim generate [--rotate]`` does (the running server, and with
[cluster] every node, signs with them from the next message on); the page
then shows the new records.

The same checks as the CLI (doctor.diagnose: every record looked up through
``[relay] dns_servers``, the certificate, the listeners), run on the event
loop with a resolver of the doctor's own lifetime per question, and bounded
as a whole by ``MAX_SECONDS``.  Only local domains are checked; the page
without ``?domain=`` lists them and looks nothing up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from postoffice.cluster.stores import generate_dkim_keys, load_dkim_keys
from postoffice.dns.resolver import DnsResolver
from postoffice.doctor import (
    LOOKUP_LIFETIME,
    Section,
    check_certificate,
    diagnose,
    records_to_publish,
)
from postoffice.mail.address import AddressError, normalise_domain
from postoffice.net.cert_status import certificate_status
from postoffice.net.http import Response, Routes
from postoffice.policy.dkim_keys import DkimKeyError
from postoffice.web.app import Page, WebApp

MAX_SECONDS = 90.0  # the whole check; a dead DNS server costs one probe (doctor.py)


@dataclass(frozen=True, slots=True)
class Checked:
    sections: list[Section]
    records: list[str]
    problems: int
    dkim_selectors: list[str]


class DnsPages:
    def __init__(self, web: WebApp) -> None:
        self.web = web

    def _domains(self) -> list[str]:
        services = self.web.services
        return sorted(set(services.accounts.list_domains()) | set(services.settings.domains))

    async def view(self, page: Page) -> Response:
        return await self._show(page, page.request.query.get("domain", "").strip())

    async def dkim(self, page: Page) -> Response:
        """Make the domain's first DKIM keys, or rotate them (``action``)."""
        wanted = page.form.get("domain", "").strip()
        domains = await self.web.blocking(self._domains)
        if wanted not in domains:
            return await self._show(page, wanted)
        rotate = page.form.get("action") == "rotate"
        settings = self.web.services.settings
        try:
            keys = await self.web.blocking(
                lambda: generate_dkim_keys(settings, wanted, rotate=rotate)
            )
        except DkimKeyError as exc:
            return await self._show(page, wanted, status=400, error=str(exc))
        selectors = ", ".join(f"{k.selector} ({k.algorithm})" for k in keys)
        done = f"made DKIM keys for {wanted}: {selectors}; publish their records below"
        return await self._show(page, wanted, notice=done)

    async def _show(self, page: Page, wanted: str, status: int = 200, **values: object) -> Response:
        domains = await self.web.blocking(self._domains)
        # The certificate the listeners serve, and its renewal (what `cert status` says).
        values["certificate"] = await self.web.blocking(
            certificate_status, self.web.services.settings
        )
        if not wanted:
            return self.web.page(
                "dns.html", page, status, domains=domains, domain="", checked=None, **values
            )
        try:
            domain = normalise_domain(wanted)
        except AddressError:
            domain = ""
        if domain not in domains:
            return self.web.page(
                "dns.html",
                page,
                404,
                domains=domains,
                domain="",
                checked=None,
                **{**values, "error": "not a local domain"},
            )
        try:
            checked = await asyncio.wait_for(self._check(domain), MAX_SECONDS)
        except TimeoutError:
            return self.web.page(
                "dns.html",
                page,
                504,
                domains=domains,
                domain=domain,
                checked=None,
                **{**values, "error": f"the checks took over {MAX_SECONDS:.0f} s; try the CLI"},
            )
        return self.web.page(
            "dns.html", page, status, domains=domains, domain=domain, checked=checked, **values
        )

    async def _check(self, domain: str) -> Checked:
        settings = self.web.services.settings
        certificate = await self.web.blocking(check_certificate, settings)
        resolver = await self.web.blocking(
            lambda: DnsResolver(settings.relay.dns_servers, lifetime=LOOKUP_LIFETIME)
        )
        sections = await diagnose(settings, resolver, [domain], certificate)
        try:
            keys = await self.web.blocking(load_dkim_keys, settings, domain)
        except DkimKeyError:
            keys = []
        records = records_to_publish(
            settings.hostname, domain, keys, settings.listen, settings.mta_sts
        )
        problems = sum(f.bad for s in sections for f in s.findings)
        return Checked(sections, records, problems, [k.selector for k in keys])


def add_routes(routes: Routes, web: WebApp) -> None:
    pages = DnsPages(web)
    routes.add("/admin/dns", web.guarded(pages.view, admin=True))
    routes.add("/admin/dns/dkim", web.guarded(pages.dkim, admin=True), ("POST",), max_body=4096)
