"""The composition root: builds every service from Settings and runs the listeners.

Nothing else in the package constructs services or knows how they fit
together; ``cli.py`` only calls ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from postoffice.config.settings import ListenAddress, Settings
from postoffice.delivery.outbound import build_outbound
from postoffice.delivery.resolver import DnsResolver
from postoffice.net.listener import Listener
from postoffice.net.tls import cert_and_key, server_context
from postoffice.policy.auth import Authenticator, LoginThrottle, PasswordHasher
from postoffice.policy.dkim_keys import KeyStore
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.mailauth import InboundChecks
from postoffice.services import Services
from postoffice.storage.maildir import MaildirStore, clean_stale_tmp
from postoffice.storage.sqlite_accounts import SqliteAccountStore

log = logging.getLogger("postoffice")


def build_services(settings: Settings) -> Services:
    """Open the stores and make the TLS context.  Blocking; call before the loop runs."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.mail_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="postoffice-io")
    accounts = SqliteAccountStore(settings.accounts_db, config_domains=settings.domains)
    cert, key = cert_and_key(settings)
    throttle = LoginThrottle(
        free_failures=settings.auth.throttle_after, max_delay=settings.auth.throttle_max_delay
    )
    authenticator = Authenticator(accounts.password_hash, PasswordHasher(), throttle, executor)
    services = Services(
        settings=settings,
        accounts=accounts,
        maildirs=MaildirStore(
            settings.mail_dir,
            executor,
            settings.hostname,
            journal_dir=settings.data_dir / "journal",
        ),
        authenticator=authenticator,
        tls=server_context(cert, key),
        executor=executor,
    )
    services.outbound = build_outbound(services)
    # SPF/DKIM/DMARC on the smtp listener and DKIM signing of submitted mail;
    # their DNS goes through [relay] dns_servers like the outbound queue's.
    resolver = DnsResolver(settings.relay.dns_servers)
    services.inbound_checks = InboundChecks(settings, resolver, executor)
    services.dkim_signer = DkimSigner(KeyStore(settings.data_dir), executor)
    return services


@dataclass
class Server:
    services: Services
    listeners: list[Listener] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)

    def _listener(
        self,
        name: str,
        addresses: tuple[ListenAddress, ...],
        handler: object,
        busy: bytes,
        implicit_tls: bool = False,
    ) -> None:
        if not addresses:
            return
        limits = self.services.settings.limits
        self.listeners.append(
            Listener(
                name=name,
                addresses=addresses,
                handler=handler,  # type: ignore[arg-type]
                busy_reply=busy,
                max_connections=limits.max_connections,
                max_per_ip=limits.max_connections_per_ip,
                tls=self.services.tls if implicit_tls else None,
            )
        )

    async def start(self) -> None:
        from postoffice.net.pop3_session import Pop3Session
        from postoffice.net.smtp_session import SmtpMode, SmtpSession

        s = self.services
        listen = s.settings.listen
        smtp_busy = b"421 4.7.0 Too many connections, try again later\r\n"
        pop_busy = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
        self._listener(
            "smtp", listen.smtp, lambda c: SmtpSession(s, c, SmtpMode.RELAY_IN).run(), smtp_busy
        )
        self._listener(
            "submission",
            listen.submission,
            lambda c: SmtpSession(s, c, SmtpMode.SUBMISSION).run(),
            smtp_busy,
        )
        self._listener(
            "submissions",
            listen.submissions,
            lambda c: SmtpSession(s, c, SmtpMode.SUBMISSION).run(),
            smtp_busy,
            implicit_tls=True,
        )
        self._listener("pop3", listen.pop3, lambda c: Pop3Session(s, c).run(), pop_busy)
        self._listener(
            "pop3s", listen.pop3s, lambda c: Pop3Session(s, c).run(), pop_busy, implicit_tls=True
        )
        for listener in self.listeners:
            await listener.start()
        if s.outbound is not None:
            self.background.append(asyncio.get_running_loop().create_task(s.outbound.run()))

    async def stop(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()
        grace = self.services.settings.limits.shutdown_grace
        await asyncio.gather(*(listener.finish(grace) for listener in self.listeners))
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _announce(server: Server) -> None:
    s = server.services.settings
    out = sys.stdout
    print(f"postoffice {s.hostname}: config {s.source}, data in {s.data_dir}", file=out)
    for listener in server.listeners:
        where = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in listener.bound)
        print(f"  {listener.name:<12} {where}", file=out)
    domains = sorted(set(s.domains) | set(server.services.accounts.list_domains()))
    print(f"  local domains: {', '.join(domains) or '(none)'}", file=out)
    if not server.services.accounts.list_users():
        config = "" if s.source.startswith("<") else f" -c {s.source}"
        domain = domains[0] if domains else "localhost"
        print(f"No users yet. Add one with:  postoffice{config} user add you@{domain}", file=out)
    out.flush()


async def _run(services: Services) -> int:
    server = Server(services)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await loop.run_in_executor(services.executor, clean_stale_tmp, services.settings.mail_dir)
    # Before listening: messages acknowledged before a crash are put back first.
    await loop.run_in_executor(services.executor, services.maildirs.recover)
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        await server.stop()
        return 1
    _announce(server)
    await stop.wait()
    log.info(
        "shutting down: no new connections; sessions get %.0fs to finish",
        services.settings.limits.shutdown_grace,
    )
    await server.stop()
    await services.maildirs.drain()  # journaled mail into its Maildirs: nothing to replay
    log.info("stopped")
    return 0


def serve(settings: Settings) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; the exit status."""
    logging.basicConfig(
        level=os.environ.get("POSTOFFICE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    services = build_services(settings)
    try:
        try:
            import uvloop  # optional: a faster event loop where installed
        except ImportError:
            return asyncio.run(_run(services))
        return uvloop.run(_run(services))
    finally:
        services.executor.shutdown(wait=True)
        services.maildirs.close()
        services.accounts.close()
