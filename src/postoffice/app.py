"""The composition root: builds every service from Settings and runs the listeners.

Nothing else in the package constructs services or knows how they fit
together; ``cli.py`` only calls ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postoffice import logfmt, metrics
from postoffice.check import first_unbindable
from postoffice.childproc import die_with_parent
from postoffice.config.settings import ListenAddress, Settings, load_settings
from postoffice.datadir import DataDirBusy, ServeLock
from postoffice.delivery.local import LocalCourier
from postoffice.delivery.outbound import Outbound, QueueHandoff
from postoffice.delivery.queue.store import QueueStore
from postoffice.delivery.remote import RemoteCourier
from postoffice.dns.resolver import DnsResolver, Resolver
from postoffice.logsetup import Logs, LogSetupError, configure
from postoffice.net.accept import AcceptShares
from postoffice.net.listener import Listener
from postoffice.net.metrics_http import MetricsEndpoint
from postoffice.net.tls import cert_and_key, server_context
from postoffice.policy.auth import (
    HASH_WAITING_PER_WORKER,
    Authenticator,
    HashingPool,
    PasswordHasher,
    default_hash_workers,
)
from postoffice.policy.dkim_keys import KeyStore
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.mailauth import InboundChecks
from postoffice.policy.srs import Srs, load_secrets
from postoffice.policy.throttle import LoginThrottle, ThrottleLimits
from postoffice.services import Services
from postoffice.storage.folder_watch import FolderWatcher
from postoffice.storage.free_space import FreeSpaceGuard
from postoffice.storage.maildir import MaildirStore, clean_stale_tmp
from postoffice.storage.quota import QuotaTracker
from postoffice.storage.sqlite_accounts import SqliteAccountStore
from postoffice.workers import (
    HELD_SIGNALS,
    WorkerPool,
    extra_journal_dirs,
    journal_dir,
    process_count,
)

log = logging.getLogger("postoffice")

# What an extra smtp process runs (workers.WorkerPool starts it).
SMTP_PROCESS_MAIN = (
    "import sys; from postoffice.app import run_smtp_process; "
    "sys.exit(run_smtp_process(sys.argv[1:]))"
)


class ListenError(OSError):
    """A listener could not bind: which one, on which addresses, and why."""

    def __init__(self, listener: Listener | MetricsEndpoint, exc: OSError) -> None:
        where = ", ".join(str(a) for a in listener.addresses)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(exc.errno, f"{listener.name} listener on {where}: {reason}")


def build_services(settings: Settings, process: int = 0) -> Services:
    """Open the stores and make the TLS context.  Blocking; call before the loop runs.

    ``process``: 0 for the server, i > 0 for its i-th extra smtp process
    (workers.py), which has its own journal and hands queued mail over."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.mail_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="postoffice-io")
    accounts = SqliteAccountStore(settings.accounts_db, config_domains=settings.domains)
    cert, key = cert_and_key(settings)
    hash_workers = settings.auth.hash_workers or default_hash_workers()
    authenticator = Authenticator(
        accounts.password_hash,
        PasswordHasher(),
        LoginThrottle(ThrottleLimits.from_settings(settings.auth)),
        HashingPool(hash_workers, max_waiting=HASH_WAITING_PER_WORKER * hash_workers),
    )
    services = Services(
        settings=settings,
        accounts=accounts,
        maildirs=MaildirStore(
            settings.mail_dir,
            executor,
            settings.hostname,
            journal_dir=journal_dir(settings.data_dir, process),
        ),
        authenticator=authenticator,
        tls=server_context(cert, key),
        executor=executor,
        folder_watcher=FolderWatcher(executor),
        srs=Srs(load_secrets(settings.data_dir)),
    )
    # One resolver for every lookup of this process, on [relay] dns_servers:
    # outbound routing, and SPF/DKIM/DMARC on the smtp listener.
    resolver = DnsResolver(settings.relay.dns_servers)
    if process == 0:
        services.outbound = _build_outbound(services, resolver)
    else:
        store = QueueStore(settings.queue_dir, executor)
        store.ensure_dirs()
        services.outbound = QueueHandoff(store)
    services.space = FreeSpaceGuard(
        (settings.data_dir, settings.mail_dir, settings.queue_dir),
        settings.limits.min_free_space,
        executor,
    )
    services.space.refresh_blocking()
    services.quota = QuotaTracker(settings.limits.mailbox_quota, accounts.quota, executor)
    # SPF/DKIM/DMARC on the smtp listener and DKIM signing of submitted mail.
    services.inbound_checks = InboundChecks(settings, resolver)  # DKIM in worker processes
    services.dkim_signer = DkimSigner(KeyStore(settings.data_dir))
    return services


def _build_outbound(services: Services, resolver: Resolver) -> Outbound:
    """The queue of the delivering process, with its couriers, routing
    through ``resolver`` (blocking)."""
    settings = services.settings
    store = QueueStore(settings.queue_dir, services.executor)
    store.ensure_dirs()
    remote = RemoteCourier(settings.relay, settings.hostname, resolver)
    local = LocalCourier(services.accounts, services.maildirs, services.is_local_domain)
    return Outbound(settings, store, remote, local, srs=services.srs)


@dataclass
class Server:
    services: Services
    listeners: list[Listener] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: MetricsEndpoint | None = None  # [listen] metrics, in the first process only

    def _listener(
        self,
        name: str,
        addresses: tuple[ListenAddress, ...],
        handler: object,
        busy: bytes,
        implicit_tls: bool = False,
        inherited: list[socket.socket] | None = None,
        shares: AcceptShares | None = None,
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
                inherited=inherited or [],
                shares=shares,
            )
        )

    async def start(
        self,
        *,
        smtp_sockets: list[socket.socket] | None = None,
        shares: AcceptShares | None = None,
    ) -> None:
        """Bind and serve.  ``smtp_sockets``: be an extra smtp process, serving
        only the smtp listener, from the server's inherited listening sockets.
        ``shares``: the smtp listener takes turns with the other smtp processes."""
        from postoffice.net.imap_session import ImapSession
        from postoffice.net.pop3_session import Pop3Session
        from postoffice.net.smtp_session import SmtpMode, SmtpSession

        s = self.services
        listen = s.settings.listen
        if listen.smtp and s.inbound_checks is not None:
            s.inbound_checks.start()  # the DKIM verifier processes, ready for the first message
        smtp_busy = b"421 4.7.0 Too many connections, try again later\r\n"
        pop_busy = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
        imap_busy = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
        self._listener(
            "smtp",
            listen.smtp,
            lambda c: SmtpSession(s, c, SmtpMode.RELAY_IN).run(),
            smtp_busy,
            inherited=smtp_sockets,
            shares=shares,
        )
        if smtp_sockets is not None:
            await self._start_listeners()
            return
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
        self._listener("imap", listen.imap, lambda c: ImapSession(s, c).run(), imap_busy)
        self._listener(
            "imaps", listen.imaps, lambda c: ImapSession(s, c).run(), imap_busy, implicit_tls=True
        )
        await self._start_listeners()
        if listen.metrics:
            outbound = s.outbound
            stats = outbound.stats if isinstance(outbound, Outbound) else None
            self.metrics = MetricsEndpoint(listen.metrics, s.executor, stats)
            try:
                await self.metrics.start()
            except OSError as exc:
                raise ListenError(self.metrics, exc) from exc
        if isinstance(s.outbound, Outbound):  # the delivering process's queue
            self.background.append(asyncio.get_running_loop().create_task(s.outbound.run()))

    async def _start_listeners(self) -> None:
        for listener in self.listeners:
            try:
                await listener.start()
            except OSError as exc:
                raise ListenError(listener, exc) from exc

    async def stop(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()
        if self.metrics is not None:
            await self.metrics.stop()
        grace = self.services.settings.limits.shutdown_grace
        await asyncio.gather(*(listener.finish(grace) for listener in self.listeners))
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.services.folder_watcher.close()


def _announce(server: Server, smtp_processes: int = 1) -> None:
    s = server.services.settings
    out = sys.stdout
    print(f"postoffice {s.hostname}: config {s.source}, data in {s.data_dir}", file=out)
    bound: list[str] = []
    endpoints: list[Listener | MetricsEndpoint] = list(server.listeners)
    if server.metrics is not None:
        endpoints.append(server.metrics)
    for listener in endpoints:
        where = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in listener.bound)
        extra = (
            f" ({smtp_processes} processes)"
            if listener.name == "smtp" and smtp_processes > 1
            else ""
        )
        print(f"  {listener.name:<12} {where}{extra}", file=out)
        bound.append(f"{listener.name}={logfmt.field(where.replace(', ', ','))}")
    domains = sorted(set(s.domains) | set(server.services.accounts.list_domains()))
    print(f"  local domains: {', '.join(domains) or '(none)'}", file=out)
    if not server.services.accounts.list_users():
        domain = domains[0] if domains else "localhost"
        if s.source.startswith("<"):  # ./postoffice-data: the CLI finds it from here only
            how, where = "postoffice", f"   (in {os.getcwd()}, where the CLI finds this data)"
        else:
            how, where = f"postoffice -c {os.path.abspath(s.source)}", ""
        print(f"No users yet. Add one with:  {how} user add you@{domain}{where}", file=out)
    out.flush()
    # The log's own record of the start (stdout is often nowhere): one
    # "started" for every "stopped", after the banner (which may share a file).
    log.info(
        "started %s hostname=%s config=%s data_dir=%s smtp_processes=%d",
        " ".join(bound),
        s.hostname,
        logfmt.field(s.source),
        logfmt.field(s.data_dir),
        smtp_processes,
    )


def _on_sighup() -> None:
    # `systemctl reload` and old habits send SIGHUP; it must not take mail down.
    log.warning("SIGHUP: reloading the config is not supported yet; ignored (restart to apply)")


async def _run(services: Services, logs: Logs) -> int:
    server = Server(services)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool: WorkerPool | None = None

    def reopen_logs() -> None:  # SIGUSR1, e.g. from logrotate's postrotate
        logs.reopen()
        log.info("SIGUSR1: log files reopened")
        if pool is not None:
            pool.send_signal(signal.SIGUSR1)

    loop.add_signal_handler(signal.SIGHUP, _on_sighup)
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    settings = services.settings
    if settings.listen.metrics:  # before any process counts: the extra ones inherit it
        metrics.enable(metrics_dir(settings), clean=True)
    await loop.run_in_executor(services.executor, clean_stale_tmp, settings.mail_dir)
    # Before listening: messages acknowledged before a crash are put back first,
    # the extra smtp processes' ones too.
    await loop.run_in_executor(services.executor, services.maildirs.recover)
    await loop.run_in_executor(services.executor, _recover_extra_journals, services)
    count = process_count(settings)
    shares = (
        AcceptShares.create(settings.data_dir, count, settings.limits.max_connections)
        if count > 1
        else None
    )
    try:
        await server.start(shares=shares)
    except OSError as exc:
        logs.fatal(f"cannot listen: {exc.strerror or exc}")
        await server.stop()
        return 1
    if count > 1:
        smtp = next(listener for listener in server.listeners if listener.name == "smtp")
        pool = WorkerPool(settings, SMTP_PROCESS_MAIN, smtp.socket_fds(), count, shares)
        pool.start()
        server.background.append(loop.create_task(pool.watch()))
    _announce(server, count)
    await stop.wait()
    log.info(
        "shutting down: no new connections; sessions get %.0fs to finish",
        settings.limits.shutdown_grace,
    )
    if pool is not None:
        pool.terminate()  # the extra processes stop accepting too, and finish
    await server.stop()
    if pool is not None:
        await pool.wait(settings.limits.shutdown_grace)
    await services.maildirs.drain()  # journaled mail into its Maildirs: nothing to replay
    if shares is not None:
        shares.close()
    log.info("stopped")
    return 0


def metrics_dir(settings: Settings) -> Path:
    """Where every process of the server writes its metric values (metrics.py)."""
    return settings.data_dir / "metrics"


def _recover_extra_journals(services: Services) -> None:
    """Restore what extra smtp processes of an earlier run acknowledged."""
    s = services.settings
    for directory in extra_journal_dirs(s.data_dir):
        store = MaildirStore(s.mail_dir, services.executor, s.hostname, journal_dir=directory)
        try:
            store.recover()
        finally:
            store.close()


async def _run_smtp_worker(services: Services, index: int, fds: list[int], logs: Logs) -> int:
    server = Server(services)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the server logs it
    loop.add_signal_handler(signal.SIGUSR1, logs.reopen)  # forwarded by the server
    if services.settings.listen.metrics:
        metrics.enable(metrics_dir(services.settings), clean=False)
    await loop.run_in_executor(services.executor, services.maildirs.recover)
    sockets = [socket.socket(fileno=fd) for fd in fds]
    shares = AcceptShares.open(services.settings.data_dir, index)
    try:
        await server.start(smtp_sockets=sockets, shares=shares)
    except OSError as exc:
        log.error("smtp process cannot listen: %s", exc)
        await server.stop()
        return 1
    log.info("smtp process %d accepting (pid %d)", index, os.getpid())
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:  # bounded by the server's life
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    await server.stop()
    await services.maildirs.drain()
    return 0


def _hold_signals() -> None:
    """Until the event loop handles them: SIGHUP and SIGUSR1 must not kill the
    server while it starts (their default action is to terminate)."""
    for sig in HELD_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # an smtp process starts blocked


def serve(settings: Settings) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; the exit status."""
    _hold_signals()
    try:
        logs = configure(settings.log)
    except LogSetupError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 2
    if not settings.data_dir.exists():
        # Nothing is made yet: a listener that cannot bind (a port in use, an
        # address this machine does not have) fails the start here, not after
        # a data directory, accounts database and certificate were made for it.
        unbindable = first_unbindable(settings)
        if unbindable:
            logs.fatal(f"cannot listen: {unbindable}")
            logs.close()
            return 1
    try:
        lock = ServeLock.acquire(settings.data_dir)
    except (DataDirBusy, OSError) as exc:
        reason = exc if isinstance(exc, DataDirBusy) else f"{exc.filename}: {exc.strerror}"
        logs.fatal(str(reason))
        logs.close()
        return 1
    try:
        services = build_services(settings)
        return _run_loop(services, _run(services, logs))
    finally:
        lock.release()
        logs.close()


def run_smtp_process(argv: list[str]) -> int:
    """Entry point of an extra smtp process (``SMTP_PROCESS_MAIN``; workers.py
    passes ``SOURCE INDEX FDS PARENT``): serves until SIGTERM or its server is gone."""
    source, index_text, fds_json, parent_text = argv
    die_with_parent(int(parent_text))
    settings = load_settings(None if source.startswith("<") else Path(source))
    index = int(index_text)
    fds = [int(fd) for fd in json.loads(fds_json)]
    _hold_signals()
    logs = configure(settings.log)  # the server checked [log] before it started us
    try:
        services = build_services(settings, process=index)
        return _run_loop(services, _run_smtp_worker(services, index, fds, logs))
    finally:
        logs.close()


def _run_loop(services: Services, main: Coroutine[Any, Any, int]) -> int:
    try:
        try:
            import uvloop  # optional: a faster event loop where installed
        except ImportError:
            return asyncio.run(main)
        return uvloop.run(main)
    finally:
        if services.inbound_checks is not None:
            services.inbound_checks.close()
        _hold_signals()  # the closed loop set them back to their defaults: not now
        services.executor.shutdown(wait=True)
        services.authenticator.close()
        services.maildirs.close()
        services.accounts.close()
