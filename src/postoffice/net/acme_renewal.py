"""The ACME certificate's lifecycle in the running server: obtain, renew, install.

The listeners never wait for the CA: they start with what ``tls.cert_and_key``
finds (the ACME certificate if one was issued before, else [tls] files or the
self-signed pair), and the log says so.  ``CertificateKeeper.run`` then
orders a certificate when there is none (or its names changed), renews it
when due (ACME Renewal Information, RFC 9773, where the CA offers it; else at
2/3 of its lifetime), and calls ``install``, the composition root's swap of
the TLS context for new sessions (sessions already up keep theirs).  A failed
order keeps the current certificate, is logged as an error and is tried
again after a growing delay.  The CA's work runs in a thread, off the loop.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable

from postoffice import logfmt
from postoffice.config.settings import Settings
from postoffice.net.acme import AcmeIssuer
from postoffice.net.cert_status import (
    CertificateInfo,
    certificate_info,
    certificate_names,
    write_renewal,
)
from postoffice.net.tls import acme_certificate
from postoffice.services import Services

log = logging.getLogger("postoffice.acme")

FIRST_RETRY_SECONDS = 30.0
LAST_RETRY_SECONDS = 6 * 3600.0  # backoff doubles up to this
# Sleep at most this long before looking again: a clock jump, a changed ARI window.
LONGEST_SLEEP_SECONDS = 6 * 3600.0


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _stamp(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).isoformat(timespec="seconds")


class CertificateKeeper:
    def __init__(self, services: Services, install: Callable[[], Awaitable[None]]) -> None:
        self.services = services
        self.issuer = AcmeIssuer(services.settings, services.acme_http01, services.acme_tls_alpn)
        self.install = install
        self.failures = 0

    @property
    def settings(self) -> Settings:
        return self.services.settings  # a reload may add names

    def _current(self) -> tuple[bytes, CertificateInfo] | None:
        path = acme_certificate(self.settings)
        try:
            pem = path.read_bytes()
            return pem, certificate_info(pem)
        except (OSError, ValueError):
            return None

    def announce(self) -> None:
        """At start, before the listeners: say which certificate they serve."""
        if self._current() is not None:
            return
        fallback = (
            "the [tls] certificate" if self.settings.tls.cert else "a self-signed certificate"
        )
        log.warning(
            "ACME: no certificate yet for %s; serving %s until the CA issues one",
            logfmt.field(",".join(certificate_names(self.settings))),
            fallback,
        )

    async def run(self) -> None:
        while True:
            due, why = await self._due()
            wait = (due - _now()).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, LONGEST_SLEEP_SECONDS))
                continue
            if self.issuer.settings.acme != self.settings.acme:  # a reload moved the CA
                self.issuer = AcmeIssuer(
                    self.settings, self.services.acme_http01, self.services.acme_tls_alpn
                )
            self.issuer.settings = self.settings
            await self._renew(why)

    async def _due(self) -> tuple[datetime.datetime, str]:
        current = await asyncio.to_thread(self._current)
        if current is None:
            return _now(), "there is none"
        pem, info = current
        wanted = set(certificate_names(self.settings))
        if not wanted <= set(info.names):
            return _now(), "names changed"
        try:
            due, why = await asyncio.to_thread(self.issuer.renewal_time, pem)
        except Exception as exc:  # the CA unreachable: the certificate's own dates
            log.warning("ACME: CA not reached for renewal information: %s", exc)
            due, why = info.default_renewal, "2/3 of its lifetime"
        state = {"next_renewal": _stamp(due), "by": why}
        await asyncio.to_thread(write_renewal, self.settings, state)
        return due, why

    async def _renew(self, why: str) -> None:
        names = ",".join(certificate_names(self.settings))
        log.info("ACME: ordering a certificate for %s (%s)", logfmt.field(names), why)
        try:
            info = await asyncio.to_thread(self.issuer.issue)
        except Exception as exc:
            self.failures += 1
            delay = min(FIRST_RETRY_SECONDS * 2 ** (self.failures - 1), LAST_RETRY_SECONDS)
            retry = _now() + datetime.timedelta(seconds=delay)
            log.error(
                "ACME: order for %s failed (%d in a row), keeping the current certificate;"
                " next try at %s: %s",
                logfmt.field(names),
                self.failures,
                _stamp(retry),
                logfmt.field(str(exc) or type(exc).__name__),
            )
            state = {"next_renewal": _stamp(retry), "by": "retry", "last_error": str(exc)}
            await asyncio.to_thread(write_renewal, self.settings, state)
            await asyncio.sleep(delay)
            return
        self.failures = 0
        log.info(
            "ACME: certificate issued for %s by %s, not after %s",
            logfmt.field(",".join(info.names)),
            logfmt.field(info.issuer),
            _stamp(info.not_after),
        )
        await self.install()
