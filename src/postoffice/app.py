"""The composition root: builds every service from Settings and runs the listeners.

Nothing else in the package constructs services or knows how they fit
together; ``cli.py`` only calls ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postoffice import logfmt, malloc_tuning, metrics, reload, runas
from postoffice.check import first_unbindable
from postoffice.childproc import die_with_parent
from postoffice.cluster.stores import open_accounts, open_signing_keys
from postoffice.config.settings import ListenAddress, ListenSettings, Settings, load_settings
from postoffice.datadir import LOCK_NAME, DataDirBusy, Owner, ServeLock
from postoffice.delivery.dmarc_reports import ReportSender
from postoffice.delivery.local import LocalCourier
from postoffice.delivery.outbound import Outbound, QueueHandoff
from postoffice.delivery.queue.store import QueueStore
from postoffice.delivery.remote import RemoteCourier
from postoffice.delivery.report_sending import run_daily
from postoffice.delivery.sieve import SieveDelivery
from postoffice.delivery.tls_policy import TlsPolicies
from postoffice.delivery.tls_reports import TlsReportSender
from postoffice.dns.resolver import DnsResolver, Resolver
from postoffice.filters.build import build_chain, filter_problems
from postoffice.filters.learn import SpamLearner
from postoffice.filters.spool import SPOOL_DIR, clean_spool_blocking
from postoffice.logsetup import Logs, LogSetupError, configure
from postoffice.net.accept import AcceptShares, bind
from postoffice.net.listener import Handler, Listener
from postoffice.net.metrics_http import metrics_routes
from postoffice.net.tls import answer_tls_alpn, cert_and_key, server_context
from postoffice.policy.auth import (
    HASH_WAITING_PER_WORKER,
    Authenticator,
    HashingPool,
    PasswordHasher,
    default_hash_workers,
)
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.dmarc_store import ReportRecorder
from postoffice.policy.mailauth import InboundChecks
from postoffice.policy.srs import Srs, load_secrets
from postoffice.policy.throttle import LoginThrottle, ThrottleLimits
from postoffice.policy.tls_rpt_store import TlsReportRecorder
from postoffice.services import OutboundQueue, Services
from postoffice.storage.folder_watch import FolderWatcher
from postoffice.storage.free_space import FreeSpaceGuard
from postoffice.storage.maildir import MaildirStore, clean_stale_tmp
from postoffice.storage.quota import QuotaTracker
from postoffice.storage.sieve_scripts import SieveScripts

if TYPE_CHECKING:
    from postoffice.delivery.queue.pg_store import PgQueueStore

from postoffice.workers import (
    HELD_SIGNALS,
    RETIRE,
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

    def __init__(self, listener: Listener, exc: OSError) -> None:
        where = ", ".join(str(a) for a in listener.addresses)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(exc.errno, f"{listener.name} listener on {where}: {reason}")


def build_services(
    settings: Settings, process: int = 0, tls: ssl.SSLContext | None = None
) -> Services:
    """Open the stores and make the TLS context.  Blocking; call before the loop runs.

    ``process``: 0 for the server, i > 0 for its i-th extra smtp process
    (workers.py), which has its own journal and hands queued mail over."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.mail_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="postoffice-io")
    accounts = open_accounts(settings, follow=True)
    if tls is None:  # else loaded as root already ([run])
        cert, key = cert_and_key(settings)
        tls = server_context(cert, key)
    hash_workers = settings.auth.hash_workers or default_hash_workers()
    closers: list[Callable[[], None]] = []
    feed = None
    if settings.cluster.enabled:
        # Failed logins counted on every node (cluster/throttle_feed.py).
        from postoffice.cluster.throttle_feed import SharedFailures

        feed = SharedFailures(settings.cluster.database)
        feed.start()
        closers.append(feed.close)
    authenticator = Authenticator(
        accounts.password_hash,
        PasswordHasher(),
        LoginThrottle(ThrottleLimits.from_settings(settings.auth), feed=feed),
        HashingPool(hash_workers, max_waiting=HASH_WAITING_PER_WORKER * hash_workers),
        lambda address: [p.digest for p in accounts.app_passwords(address)],
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
        tls=tls,
        executor=executor,
        folder_watcher=FolderWatcher(executor),
        srs=Srs(load_secrets(settings.data_dir)),
        closers=closers,
    )
    # One resolver for every lookup of this process, on [relay] dns_servers:
    # outbound routing, and SPF/DKIM/DMARC on the smtp listener.
    resolver = DnsResolver(settings.relay.dns_servers)
    # Before the queue: it signs the DSNs it makes, and its remote courier
    # signs again after an 8-bit conversion.
    signing_keys = open_signing_keys(settings, follow=True)
    services.closers.append(signing_keys.close)
    services.dkim_signer = DkimSigner(signing_keys)
    if process == 0:
        services.outbound = _build_outbound(services, resolver)
    elif settings.cluster.enabled:
        services.outbound = _cluster_handoff(settings, executor)
    else:
        store = QueueStore(settings.queue_dir, executor)
        store.ensure_dirs()
        services.outbound = QueueHandoff(store)
    # Users' Sieve scripts run after each INBOX delivery (delivery/sieve.py);
    # replies and redirects go through this process's queue (or hand-off).
    sieve = services.maildirs.after_delivery = SieveDelivery(
        SieveScripts(settings.sieve_dir),
        settings.mail_dir,
        executor,
        services.outbound,
        hostname=settings.hostname,
        srs=services.srs,
        is_local_domain=services.is_local_domain,
    )
    services.sieve_ereject = sieve.ereject
    services.space = FreeSpaceGuard(
        (settings.data_dir, settings.mail_dir, settings.queue_dir),
        settings.limits.min_free_space,
        executor,
    )
    services.space.refresh_blocking()
    services.quota = QuotaTracker(settings.limits.mailbox_quota, accounts.quota, executor)
    if settings.cluster.enabled:
        from postoffice.cluster.pop3_lock import ClusterMaildropLocks

        services.pop3_locks = ClusterMaildropLocks(settings.cluster.database)
    # SPF/DKIM/DMARC on the smtp listener and DKIM signing of submitted mail.
    # Its DMARC verdicts are recorded for aggregate reports (policy/dmarc_store.py).
    services.inbound_checks = InboundChecks(
        settings, resolver, reports=ReportRecorder(settings.data_dir)
    )  # DKIM in worker processes
    services.resolver = resolver
    # [filters] (filters/build.py): serve refused a bad one before this.
    services.filters = build_chain(settings.filters)
    if settings.filters.rspamd_controller:  # filters/learn.py: IMAP moves train rspamd
        services.spam_learner = SpamLearner(settings.filters.rspamd_controller)
    if services.filters is not None:
        spool = settings.data_dir / SPOOL_DIR
        if process == 0:  # before the extra smtp processes start spooling
            clean_spool_blocking(spool)
        else:
            spool.mkdir(mode=0o700, exist_ok=True)
    return services


def _build_outbound(services: Services, resolver: Resolver) -> Outbound:
    """The queue of the delivering process, with its couriers, routing
    through ``resolver`` (blocking)."""
    settings = services.settings
    store = QueueStore(settings.queue_dir, services.executor)
    if not settings.cluster.enabled:  # a [cluster] node's queue is in the database
        store.ensure_dirs()
    # Outbound TLS policy: MTA-STS (cached under data_dir/mta-sts), [relay] tls;
    # each connection's TLS outcome recorded for TLS reports (policy/tls_rpt_store.py).
    policies = TlsPolicies(settings.relay, settings.data_dir, resolver)
    remote = RemoteCourier(
        settings.relay,
        settings.hostname,
        resolver,
        signer=services.dkim_signer,
        policies=policies,
        tls_reports=TlsReportRecorder(settings.data_dir),
    )
    local = LocalCourier(services.accounts, services.maildirs, services.is_local_domain)
    if settings.cluster.enabled:
        # Imported here: the embedded default never loads the driver.
        from postoffice.delivery.cluster_outbound import ClusterOutbound, node_name

        queue = _pg_queue(settings, services.executor, node_name())
        return ClusterOutbound(
            settings, queue, store, remote, local, srs=services.srs, signer=services.dkim_signer
        )
    return Outbound(settings, store, remote, local, srs=services.srs, signer=services.dkim_signer)


def _pg_queue(settings: Settings, executor: ThreadPoolExecutor, node: str) -> PgQueueStore:
    """The [cluster] queue (ClusterError without the database, like the
    accounts: a node cannot start without it)."""
    from postoffice.delivery.queue.pg_store import PgQueueStore

    return PgQueueStore(settings.cluster.database, node, executor)


def _cluster_handoff(settings: Settings, executor: ThreadPoolExecutor) -> OutboundQueue:
    from postoffice.delivery.cluster_outbound import ClusterHandoff, node_name

    return ClusterHandoff(_pg_queue(settings, executor, node_name()))


@dataclass
class Server:
    services: Services
    listeners: list[Listener] = field(default_factory=list)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # name -> (handler, busy line, implicit TLS, shares): how to make it again.
    specs: dict[str, tuple[Handler, bytes, bool, AcceptShares | None]] = field(default_factory=dict)
    # Listeners a reload moved: no longer accepting, their sessions run on.
    retired: list[Listener] = field(default_factory=list)
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    stopping: bool = False  # set before the listeners stop: no reload after that
    # Sockets bound as root before [run] dropped it, by listener name.
    prebound: dict[str, list[socket.socket]] = field(default_factory=dict)

    def _listener(
        self,
        name: str,
        addresses: tuple[ListenAddress, ...],
        handler: Handler,
        busy: bytes,
        implicit_tls: bool = False,
        inherited: list[socket.socket] | None = None,
        shares: AcceptShares | None = None,
    ) -> None:
        # Kept for a reload that moves the listener (``rebind``).
        self.specs[name] = (handler, busy, implicit_tls, shares)
        if not addresses:
            return
        inherited = inherited or self.prebound.pop(name, None)
        self.listeners.append(self._make_listener(name, addresses, inherited))

    def _make_listener(
        self,
        name: str,
        addresses: tuple[ListenAddress, ...],
        inherited: list[socket.socket] | None = None,
    ) -> Listener:
        handler, busy, implicit_tls, shares = self.specs[name]
        limits = self.services.settings.limits
        return Listener(
            name=name,
            addresses=addresses,
            handler=handler,
            busy_reply=busy,
            max_connections=limits.max_connections,
            max_per_ip=limits.max_connections_per_ip,
            tls=self.services.tls if implicit_tls else None,
            inherited=inherited or [],
            shares=shares,
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
        from postoffice.net import web
        from postoffice.net.http import BUSY_REPLY, HttpSession
        from postoffice.net.imap_session import ImapSession
        from postoffice.net.managesieve_session import ManageSieveSession
        from postoffice.net.pop3_session import Pop3Session
        from postoffice.net.smtp_session import SmtpMode, SmtpSession

        s = self.services
        listen = s.settings.listen
        if s.settings.acme.directory and listen.https:
            answer_tls_alpn(s.tls, s.acme_tls_alpn)  # ACME tls-alpn-01 (net/acme.py)
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
        self._listener(
            "managesieve",
            listen.managesieve,
            lambda c: ManageSieveSession(s, c).run(),
            b'BYE (TRYLATER) "Too many connections, try again later"\r\n',
        )
        # Client autoconfiguration over HTTPS, with the mail certificate; port 80
        # redirects to it (net/web.py).
        https, http = web.https_routes(s), web.http_routes(s)
        pages = None
        if listen.https:
            from postoffice.web.routes import add_routes as add_web_pages  # Jinja2: only if served

            pages = add_web_pages(https, s)
        self._listener(
            "https",
            listen.https,
            lambda c: HttpSession(c, https, "https").run(),
            BUSY_REPLY,
            implicit_tls=True,
        )
        self._listener(
            "http", listen.http, lambda c: HttpSession(c, http, "http").run(), BUSY_REPLY
        )
        # Prometheus' scrapes (net/metrics_http.py), with the queue's gauges.
        stats = s.outbound.stats if isinstance(s.outbound, Outbound) else None
        scrape = metrics_routes(s.executor, stats)
        self._listener(
            "metrics", listen.metrics, lambda c: HttpSession(c, scrape, "metrics").run(), BUSY_REPLY
        )
        await self._start_listeners()
        if pages is not None:  # the dashboard's samples of the traffic counters
            self.background.append(asyncio.get_running_loop().create_task(pages.history.run()))
        if isinstance(s.outbound, Outbound):  # the delivering process's queue
            self.background.append(asyncio.get_running_loop().create_task(s.outbound.run()))
            if s.resolver is not None:  # DMARC and TLS reports, daily after the UTC day boundary
                dmarc = ReportSender(s.settings, s.resolver, s.outbound, s.dkim_signer)
                tlsrpt = TlsReportSender(s.settings, s.resolver, s.outbound, s.dkim_signer)
                daily = run_daily([("dmarc", dmarc.run_once), ("tlsrpt", tlsrpt.run_once)])
                self.background.append(asyncio.get_running_loop().create_task(daily))

    async def _start_listeners(self) -> None:
        for listener in self.listeners:
            try:
                await listener.start()
            except OSError as exc:
                raise ListenError(listener, exc) from exc

    def refresh(self) -> None:
        """After a reload: the new caps and certificate for the next connections."""
        limits = self.services.settings.limits
        if self.services.settings.acme.directory:
            answer_tls_alpn(self.services.tls, self.services.acme_tls_alpn)
        for listener in self.listeners:
            listener.max_connections = limits.max_connections
            listener.max_per_ip = limits.max_connections_per_ip
            if listener.tls is not None:
                listener.tls = self.services.tls

    async def rebind(self, listen: ListenSettings) -> list[str]:
        """Move the listeners whose addresses differ in ``listen``; the names of
        those moved.  Sessions of a moved listener run on (it only stops
        accepting); the other listeners are not touched.

        Every new listener is started before any old one stops: an address
        that stays keeps its listening socket (a duplicate of it goes to the
        new listener), only the added addresses are bound.  A failure there
        (a port in use; below 1024 after [run] dropped root) raises
        ListenError with nothing changed: no old socket was closed."""
        current = {listener.name: listener for listener in self.listeners}
        changed: list[tuple[str, Listener | None, tuple[ListenAddress, ...]]] = []
        for name in self.specs:
            old = current.get(name)
            addresses: tuple[ListenAddress, ...] = getattr(listen, name)
            if (old.addresses if old else ()) != addresses:
                changed.append((name, old, addresses))
        started: list[Listener] = []
        try:
            for name, old, addresses in changed:
                if addresses:
                    started.append(await self._start_listener(name, addresses, old))
        except ListenError:
            for new in started:
                new.stop_accepting()  # its kept sockets are duplicates: the old stay open
            raise
        for new in started:
            self.listeners.append(new)
        for _name, old, _addresses in changed:
            if old is not None:
                self._retire(old)
        for listener in self.listeners:
            if listener.shares is not None:  # a retired one's stop left the sharing
                listener.shares.accepting(True)
        return [name for name, _old, _addresses in changed]

    async def _start_listener(
        self, name: str, addresses: tuple[ListenAddress, ...], old: Listener | None
    ) -> Listener:
        listener = self._make_listener(name, addresses)
        sockets = _kept_sockets(old, set(addresses)) if old is not None else []
        try:
            for address in addresses:
                if old is None or address not in old.addresses:
                    sockets.extend(bind(address))
            listener.inherited = sockets
            await listener.start()
        except OSError as exc:
            listener.stop_accepting()
            for sock in sockets:
                sock.close()
            raise ListenError(listener, exc) from exc
        return listener

    def _retire(self, listener: Listener) -> None:
        listener.stop_accepting()
        self.listeners.remove(listener)
        # Those retired earlier whose sessions have all ended are done with.
        self.retired = [old for old in self.retired if old.tasks]
        self.retired.append(listener)

    async def stop(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()
        grace = self.services.settings.limits.shutdown_grace
        every = self.listeners + self.retired
        await asyncio.gather(*(listener.finish(grace) for listener in every))
        tasks = list(self.background)  # a finished reload removes itself
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.services.folder_watcher.close()


def _kept_sockets(old: Listener, keep: set[ListenAddress]) -> list[socket.socket]:
    """Duplicates of ``old``'s listening sockets bound to an address in
    ``keep``: the new listener accepts from the same queue, and the port is
    never closed (nor bound again, which may need root)."""
    wanted: set[tuple[str, int]] = set()
    for address in keep & set(old.addresses):
        for *_rest, sockaddr in socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            wanted.add((str(sockaddr[0]), int(sockaddr[1])))
    kept: list[socket.socket] = []
    for fd in old.socket_fds():
        sock = socket.socket(fileno=os.dup(fd))
        name = sock.getsockname()
        if (str(name[0]), int(name[1])) in wanted:
            kept.append(sock)
        else:
            sock.close()
    return kept


def _announce(server: Server, smtp_processes: int = 1) -> None:
    s = server.services.settings
    out = sys.stdout
    print(f"postoffice {s.hostname}: config {s.source}, data in {s.data_dir}", file=out)
    bound: list[str] = []
    for listener in server.listeners:
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


async def _reload(server: Server, pool: WorkerPool | None) -> None:
    """SIGHUP (``systemctl reload``, ``postoffice reload``): read the config and
    certificate again and apply what can change live (reload.py); a config
    that cannot be used is refused, with the reason, and the running one stays."""
    services = server.services
    old = services.settings
    loop = asyncio.get_running_loop()
    try:
        loaded = await loop.run_in_executor(services.executor, reload.load, old.source)
    except reload.ReloadError as exc:
        log.error("SIGHUP: reload refused, the running config stays: %s", exc)
        return
    settings, waiting = reload.effective(old, loaded.settings)
    try:
        moved = await server.rebind(settings.listen)
    except ListenError as exc:
        log.error("SIGHUP: reload refused, the running config stays: cannot listen: %s", exc)
        return
    reload.apply(services, settings, loaded.tls)
    server.refresh()
    if pool is not None:
        smtp = next((lr for lr in server.listeners if lr.name == "smtp"), None)
        if "smtp" in moved and smtp is not None:
            pool.replace(smtp.socket_fds())  # they serve the new sockets
        else:
            pool.send_signal(signal.SIGHUP)  # they reload the same way
    for listener in server.listeners:
        if listener.name in moved:
            where = ",".join(
                f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in listener.bound
            )
            log.info("SIGHUP: %s listener now on %s", listener.name, where)
    log.info(
        "SIGHUP: reloaded config=%s moved=%s restart_needed_for=%s",
        logfmt.field(settings.source),
        ",".join(moved) or "-",
        ",".join(waiting) or "-",
    )


async def _reload_smtp_process(server: Server) -> None:
    """An extra smtp process's half of a reload (the server checked the
    config first, and moves the smtp listener by replacing the processes)."""
    services = server.services
    loop = asyncio.get_running_loop()
    try:
        loaded = await loop.run_in_executor(
            services.executor, reload.load, services.settings.source
        )
    except reload.ReloadError as exc:
        log.error("SIGHUP: reload refused, the running config stays: %s", exc)
        return
    settings, _waiting = reload.effective(services.settings, loaded.settings)
    reload.apply(services, settings, loaded.tls)
    server.refresh()
    log.info("SIGHUP: smtp process reloaded config=%s", logfmt.field(settings.source))


async def _install_certificate(server: Server, pool: WorkerPool | None) -> None:
    """A new ACME certificate (net/acme_renewal.py) into every TLS listener,
    the way a reload puts one: new sessions get it, sessions already up keep
    theirs; the extra smtp processes load it on their SIGHUP."""
    services = server.services
    loop = asyncio.get_running_loop()
    try:
        tls = await loop.run_in_executor(
            services.executor, lambda: server_context(*cert_and_key(services.settings))
        )
    except (OSError, ssl.SSLError) as exc:
        log.error("ACME: the new certificate does not load, the current one stays: %s", exc)
        return
    async with server.reloading:
        if server.stopping:
            return
        services.tls = tls
        server.refresh()
        if pool is not None:
            pool.send_signal(signal.SIGHUP)
    log.info("ACME: new certificate in the TLS listeners")


def _on_reload(server: Server, reload_once: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """One reload at a time, in the order the signals came."""

    async def serialised() -> None:
        # Held while the server starts too: a SIGHUP then waits for the
        # listeners, and one that comes after the stop began starts nothing.
        async with server.reloading:
            if server.stopping:
                log.warning("SIGHUP: not reloaded, the server is stopping")
                return
            await reload_once()

    task = asyncio.get_running_loop().create_task(serialised())
    server.background.append(task)
    task.add_done_callback(server.background.remove)


async def _run(
    services: Services, logs: Logs, prebound: dict[str, list[socket.socket]] | None = None
) -> int:
    server = Server(services, prebound=prebound or {})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    _release_stop_signals()  # one sent while we started: the start finishes, then the stop
    pool: WorkerPool | None = None

    def reopen_logs() -> None:  # SIGUSR1, e.g. from logrotate's postrotate
        logs.reopen()  # the writer thread logs whether it could
        if pool is not None:
            pool.send_signal(signal.SIGUSR1)

    loop.add_signal_handler(signal.SIGHUP, _on_reload, server, lambda: _reload(server, pool))
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs)
    signal.signal(RETIRE, signal.SIG_IGN)  # for the extra smtp processes only
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
    keeper = None
    if settings.acme.directory:  # the listeners do not wait for the CA
        from postoffice.net.acme_renewal import CertificateKeeper  # certbot's acme, requests

        keeper = CertificateKeeper(services, lambda: _install_certificate(server, pool))
        await loop.run_in_executor(services.executor, keeper.announce)
    async with server.reloading:  # a SIGHUP meanwhile waits for this (_on_reload)
        try:
            await server.start(shares=shares)
        except OSError as exc:
            logs.fatal(f"cannot listen: {exc.strerror or exc}")
            server.stopping = True
            await server.stop()
            return 1
        if count > 1:
            smtp = next(listener for listener in server.listeners if listener.name == "smtp")
            pool = WorkerPool(settings, SMTP_PROCESS_MAIN, smtp.socket_fds(), count, shares)
            pool.start()
            server.background.append(loop.create_task(pool.watch()))
        _announce(server, count)
        if keeper is not None:
            server.background.append(loop.create_task(keeper.run()))
        # Held until now (children started meanwhile keep them blocked); a
        # SIGHUP that came meanwhile is handled now, after the start.
        _release_signals()
    await stop.wait()
    server.stopping = True
    async with server.reloading:
        pass  # a reload under way finishes before the listeners stop
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
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    _release_stop_signals()
    # Forwarded by the server once it took the new config.
    loop.add_signal_handler(signal.SIGHUP, _on_reload, server, lambda: _reload_smtp_process(server))
    loop.add_signal_handler(signal.SIGUSR1, logs.reopen)  # forwarded by the server
    retire = asyncio.Event()
    loop.add_signal_handler(RETIRE, retire.set)
    if services.settings.listen.metrics:
        metrics.enable(metrics_dir(services.settings), clean=False)
    await loop.run_in_executor(services.executor, services.maildirs.recover)
    sockets = [socket.socket(fileno=fd) for fd in fds]
    shares = AcceptShares.open(services.settings.data_dir, index)
    async with server.reloading:  # a SIGHUP meanwhile waits for this (_on_reload)
        try:
            await server.start(smtp_sockets=sockets, shares=shares)
        except OSError as exc:
            log.error("smtp process cannot listen: %s", exc)
            server.stopping = True
            await server.stop()
            return 1
        _release_signals()  # a SIGHUP or retire sent while we started: handled now
    log.info("smtp process %d accepting (pid %d)", index, os.getpid())
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:  # bounded by the server's life
        if retire.is_set():
            for listener in server.listeners:
                listener.stop_accepting()
            if not any(listener.tasks for listener in server.listeners):
                log.info("smtp process %d replaced by a reload: sessions ended", index)
                break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2 if retire.is_set() else 1.0)
    server.stopping = True
    async with server.reloading:
        pass  # a reload under way finishes first
    await server.stop()
    await services.maildirs.drain()
    return 0


# SIGTERM and SIGINT: stop.  Held from the start of serve until the loop's
# handlers exist, and released then, before the listeners: a stop sent
# while the server starts must neither kill it half-made (the lock, the data
# directory, the accounts database being opened) nor be lost.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _hold_signals() -> None:
    """Until the event loop handles them, SIGHUP, SIGUSR1 and SIGUSR2 wait
    blocked: their default action would end the process, and one ignored
    would be lost (a reload or a retire sent while an smtp process starts
    must still happen).  An smtp process starts with them blocked already
    (workers.py); threads started meanwhile inherit the mask.  SIGTERM and
    SIGINT too (STOP_SIGNALS), until ``_release_stop_signals``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS | set(STOP_SIGNALS))


def _release_stop_signals() -> None:
    """The loop handles SIGTERM and SIGINT now: one pending sets the stop,
    which waits for the start to finish."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _release_signals() -> None:
    """The loop handles them now: the ones pending are delivered at once."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


def serve(settings: Settings) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT; the exit status."""
    _hold_signals()
    try:
        who: runas.Identity | runas.RunAsError = runas.identity(settings.run)
    except runas.RunAsError as exc:
        who = exc
    # The log file is the [run] user's: its smtp processes open it after the
    # drop, and SIGUSR1 reopens it as that user (logsetup.open_log_file).
    owner = who.owner if isinstance(who, runas.Identity) else None
    try:
        logs = configure(settings.log, hand_to=(owner.uid, owner.gid) if owner else None)
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
    if isinstance(who, runas.RunAsError):
        logs.fatal(str(who))
        logs.close()
        return 1
    for problem in filter_problems(settings.filters):  # a hook that does not load
        logs.fatal(problem)
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
        prebound: dict[str, list[socket.socket]] = {}
        tls: ssl.SSLContext | None = None
        if who.owner is not None:
            try:
                prebound = _bind_as_root(settings, who.owner)
            except (OSError, ssl.SSLError) as exc:
                logs.fatal(f"cannot start as {settings.run.user}: {exc.strerror or exc}")
                return 1
            # Loaded as the run user, as every reload and smtp process loads it:
            # a key only root can read would start, then refuse every SIGHUP.
            try:
                tls = server_context(*cert_and_key(settings))
            except (OSError, ssl.SSLError) as exc:
                logs.fatal(f"{runas.tls_refusal(settings)}: {exc}")
                return 1
        log.info("%s", who.note)
        malloc_tuning.tune()  # message bodies reuse freed memory (malloc_tuning.py)
        services = build_services(settings, tls=tls)
        return _run_loop(services, _run(services, logs, prebound))
    finally:
        lock.release()
        logs.close()


def _bind_as_root(settings: Settings, owner: Owner) -> dict[str, list[socket.socket]]:
    """Bind every listener (ports below 1024 need root), then become ``owner``
    for good ([run], runas.py).  The data directory is the owner's: made so
    when new, and one root owns is handed over (nothing of the owner's is in
    it yet to trick root with)."""
    bound: dict[str, list[socket.socket]] = {}
    try:
        for name in ListenSettings.__dataclass_fields__:
            addresses: tuple[ListenAddress, ...] = getattr(settings.listen, name)
            bound[name] = [sock for address in addresses for sock in bind(address)]
    except OSError:
        for sockets in bound.values():
            for sock in sockets:
                sock.close()
        raise
    data_dir = settings.data_dir
    if Owner.of(data_dir).uid == 0 and {p.name for p in data_dir.iterdir()} <= {LOCK_NAME}:
        os.chown(data_dir / LOCK_NAME, owner.uid, owner.gid, follow_symlinks=False)
        os.chown(data_dir, owner.uid, owner.gid)
    found = Owner.of(data_dir)
    if found.uid != owner.uid:
        raise OSError(
            errno.EPERM,
            f"the data directory {data_dir} belongs to {found.name}, not to the [run] user"
            f" {owner.name}; chown -R {owner.name} {data_dir}",
        )
    owner.become()
    return bound


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
        if services.pop3_locks is not None:
            services.pop3_locks.close()
        for close in services.closers:
            close()
