"""``postoffice check``: will this config start, and is the data dir usable?

The config itself was already loaded (a ConfigError never gets here).  The
check changes nothing on disk: it does not create the data dir, generate a
certificate or create the accounts database, it only says whether starting
the server would be able to.  (Whether a missing data dir can be made is
tried with a directory made and removed at once: permission bits do not tell,
root may write anywhere but in /proc or on a read-only file system.)

It also tries each listen address (bind, then close: in use, or not an
address of this machine, is what makes ``serve`` fail), and looks for
files in the data dir that its owner, the user the server runs as, cannot
use (made by root, say) and for broken Maildirs.

Run as root on a data dir another user owns, what serve opens as root (the
ports, the [tls] files, the [log] file) is checked first, as root; then the
CLI becomes the data dir's owner (cli.py) and the data dir is checked as the
user the server runs as there, so it sees what that user can use.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import ssl
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from postoffice.cluster.stores import open_accounts
from postoffice.config.settings import ListenAddress, Settings
from postoffice.datadir import Owner, running_servers, serving_pid, user_name
from postoffice.filters.build import filter_problems
from postoffice.logsetup import problems as log_problems
from postoffice.mail.address import Address
from postoffice.net.tls import CERT_NAME, KEY_NAME, server_context
from postoffice.runas import RunAsError, as_user, identity, tls_refusal
from postoffice.storage.accounts import AccountError
from postoffice.storage.maildir import SUBDIRS

_NO_DOMAINS = "warning: no local domains: no mail is delivered here (postoffice domain add NAME)"


def _check_data_dir(data_dir: Path) -> list[str]:
    if data_dir.exists():
        if not data_dir.is_dir():
            return [f"data_dir {data_dir} is not a directory"]
        if not os.access(data_dir, os.W_OK | os.X_OK):
            return [f"data_dir {data_dir} is not writable"]
        return []
    # Not there yet: the nearest existing parent must let us create it.
    parent = data_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [f"data_dir {data_dir} does not exist and cannot be created in {parent}"]
    probe = parent / f".postoffice-check-{secrets.token_hex(4)}"
    try:
        probe.mkdir(mode=0o700)
    except OSError as exc:
        return [
            f"data_dir {data_dir} does not exist and cannot be created in {parent}: {exc.strerror}"
        ]
    probe.rmdir()
    return []


# Walked for ownership: the data dir's top level, and these below it (Maildirs
# are mail/<domain>/<localpart>/{tmp,new,cur}; their message files are not).
_OWNED_TREES = ("tls", "dkim", "journal", "queue")
MAX_LISTED = 10  # paths named per problem; the rest are counted


def check_ownership(data_dir: Path) -> list[str]:
    """Directories and files the data dir's owner may not be able to use, and
    broken Maildirs: one line each kind (empty when all is well)."""
    if not data_dir.is_dir():
        return []
    owner = Owner.of(data_dir)
    foreign: list[tuple[Path, int]] = []
    broken: list[str] = []

    def note(path: Path) -> None:
        with contextlib.suppress(OSError):
            uid = path.lstat().st_uid
            if uid != owner.uid:
                foreign.append((path, uid))

    for entry in _listdir(data_dir):
        note(entry)
        if entry.name in _OWNED_TREES and entry.is_dir():
            for below in _listdir(entry):
                note(below)
    mail = data_dir / "mail"
    for domain in _listdir(mail):
        note(domain)
        for mailbox in _listdir(domain):
            note(mailbox)
            for name in SUBDIRS:
                path = mailbox / name
                if path.exists() and not path.is_dir():
                    broken.append(f"{path.relative_to(data_dir)} is not a directory")
                elif path.exists():
                    note(path)
    problems = []
    if foreign:
        names = ", ".join(
            f"{p.relative_to(data_dir)} ({user_name(uid)})" for p, uid in foreign[:MAX_LISTED]
        )
        more = f" and {len(foreign) - MAX_LISTED} more" if len(foreign) > MAX_LISTED else ""
        problems.append(
            f"{len(foreign)} path(s) in {data_dir} are not owned by its owner {owner.name}:"
            f" {names}{more}; a server running as {owner.name} cannot use them"
            f" (fix: chown -R {owner.name}:{owner.group} {data_dir})"
        )
    if broken:
        problems.append(
            f"broken Maildir(s), deliveries to them fail: {'; '.join(broken[:MAX_LISTED])}"
        )
    return problems


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _servers_elsewhere(data_dir: Path) -> list[str]:
    """With no data dir yet: is the server meant perhaps running on another one?"""
    if data_dir.exists():
        return []
    return [f"note: a server is running elsewhere: {s.describe()}" for s in running_servers()]


def _check_tls(settings: Settings, configured: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) about the certificate the server would use: the
    [tls] files (``configured``), else the self-signed pair in the data dir."""
    if settings.tls.cert and settings.tls.key:
        if not configured:
            return [], []
        cert, key = settings.tls.cert, settings.tls.key
    elif configured:
        return [], []
    else:
        cert, key = settings.tls_dir / CERT_NAME, settings.tls_dir / KEY_NAME
        if not (cert.is_file() and key.is_file()):
            return [], ["no [tls] configured: a self-signed certificate is made on first start"]
    try:
        server_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        return [f"TLS certificate {cert} / key {key} do not load: {exc}"], []
    return [], [f"TLS certificate {cert} loads"]


def _check_accounts(settings: Settings) -> tuple[list[str], list[str]]:
    if settings.cluster.enabled:
        where = "accounts in the [cluster] database"  # not the URL: it may hold a password
    else:
        db = settings.accounts_db
        if not db.exists():
            notes = [f"accounts database {db} is created on first use"]
            if not settings.domains:
                notes.append(_NO_DOMAINS)
            return [], notes
        where = f"accounts database {db}"
    try:
        store = open_accounts(settings, follow=False)
    except AccountError as exc:
        return [str(exc)], []
    try:
        domains = sorted(set(settings.domains) | set(store.list_domains()))
        users = store.list_users()
        notes = [f"{where}: {len(users)} user(s), {len(domains)} local domain(s)"]
        if not domains:
            notes.append(_NO_DOMAINS)
        for domain in domains:
            # RFC 5321 §4.5.1: every domain must accept mail for postmaster.
            found = store.resolve(Address("postmaster", domain))
            if found is None or not found.exists:
                notes.append(
                    f"warning: nobody receives postmaster@{domain} (RFC 5321 4.5.1); e.g."
                    f" postoffice alias add postmaster@{domain} you@{domain}"
                )
    finally:
        store.close()
    return [], notes


_LISTENERS = (
    "smtp",
    "submission",
    "submissions",
    "pop3",
    "pop3s",
    "imap",
    "imaps",
    "managesieve",
    "metrics",
    "http",
    "https",
)


def _check_listeners(settings: Settings) -> tuple[list[str], list[str]]:
    """(problems, notes): ports given twice, and what binding each address says."""
    listen = settings.listen
    named = [(name, a) for name in _LISTENERS for a in getattr(listen, name)]
    bound = Counter((a.host, a.port) for _name, a in named if a.port != 0)
    problems = [
        f"{host}:{port} is used by more than one listener"
        for (host, port), n in bound.items()
        if n > 1
    ]
    notes: list[str] = []
    pid = serving_pid(settings.data_dir)
    if pid is not None:
        notes.append(
            f"a server (pid {pid}) runs on this data directory: addresses in use are"
            " taken to be its own"
        )
    for name, address in named:
        reason = try_bind(address)
        if reason is None:
            continue
        code, text = reason
        label = f"{name} listener {address}"
        if code == errno.EADDRINUSE and pid is not None:
            continue
        if code == errno.EACCES:
            notes.append(
                f"warning: {label}: {text} for this user; serve must start as root"
                " or with CAP_NET_BIND_SERVICE"
            )
        elif code == errno.EADDRNOTAVAIL:
            problems.append(f"{label}: {address.host} is not an address of this machine")
        else:
            problems.append(f"{label}: {text}")
    return problems, notes


def first_unbindable(settings: Settings) -> str | None:
    """The first listen address that cannot be bound, as serve says it
    ("pop3s listener on 127.0.0.1:995: Address already in use"); None."""
    for name in _LISTENERS:
        for address in getattr(settings.listen, name):
            failed = try_bind(address)
            if failed is not None:
                return f"{name} listener on {address}: {failed[1]}"
    return None


def try_bind(address: ListenAddress) -> tuple[int, str] | None:
    """Bind (as serve would, SO_REUSEADDR) and close; None or (errno, reason)."""
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return 0, f"cannot resolve {address.host}: {exc.strerror}"
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):  # as asyncio binds: v6 only
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return exc.errno or 0, exc.strerror or str(exc)
    return None


def _check_run_user(settings: Settings) -> list[str]:
    """Run as root: would serve start ([run], runas.py), and does the user it
    becomes own the data directory?"""
    try:
        who = identity(settings.run)
    except RunAsError as exc:
        return [str(exc)]
    if who.owner is None:
        return []
    found_problems = _run_user_files(settings, who.owner)
    if not settings.data_dir.is_dir():
        return found_problems
    found = Owner.of(settings.data_dir)
    if found.uid == who.owner.uid:
        return found_problems
    return [
        *found_problems,
        f"the data directory {settings.data_dir} belongs to {found.name}, not to the [run] user"
        f" {settings.run.user}: serve would refuse to start"
        f" (fix: chown -R {settings.run.user} {settings.data_dir})",
    ]


def _run_user_files(settings: Settings, owner: Owner) -> list[str]:
    """What the [run] user itself must open: the [tls] files (at start and on
    every reload) and the [log] file's directory (SIGUSR1 makes the new log
    file there after logrotate moved the old one)."""
    found: list[str] = []
    if settings.tls.cert and settings.tls.key:
        cert, key = settings.tls.cert, settings.tls.key

        def load_tls() -> str:
            server_context(cert, key)
            return ""

        answer = as_user(owner, load_tls)
        if answer:
            found.append(f"{tls_refusal(settings)}: {answer}")
    log_file = settings.log.file
    if log_file is not None:
        directory = log_file.parent

        def can_create() -> str:
            return "" if os.access(directory, os.W_OK | os.X_OK) else "no"

        if as_user(owner, can_create):
            found.append(
                f"the [run] user {settings.run.user} cannot create files in {directory}:"
                f" the [log] file could not be reopened (SIGUSR1) after logrotate moved it;"
                f" chown {settings.run.user} {directory}, or log to a directory of its own"
            )
    return found


def problems_and_notes(
    settings: Settings, become_owner: Callable[[], None] = lambda: None
) -> tuple[list[str], list[str]]:
    """Everything ``check`` reports.  What serve opens as root (ports, [tls]
    files, the [log] file) is checked first; then ``become_owner`` (the CLI
    run as root on the service user's data dir becomes that user), then the
    data dir, as the user who runs the server there."""
    logs = log_problems(settings.log)
    listeners = _check_listeners(settings)
    configured_tls = _check_tls(settings, configured=True)
    run_user = _check_run_user(settings)
    become_owner()
    problems = _check_data_dir(settings.data_dir) + check_ownership(settings.data_dir)
    problems += logs + run_user + filter_problems(settings.filters)
    notes: list[str] = _servers_elsewhere(settings.data_dir)
    for more_problems, more_notes in (
        listeners,
        configured_tls,
        _check_tls(settings, configured=False),
        _check_accounts(settings),
    ):
        problems += more_problems
        notes += more_notes
    return problems, notes


def run_check(settings: Settings, become_owner: Callable[[], None] = lambda: None) -> int:
    """Print the result; 0 when the server can start, 1 with each problem otherwise."""
    problems, notes = problems_and_notes(settings, become_owner)
    print(f"config: {settings.source}")
    for note in notes:
        print(f"  {note}")
    for problem in problems:
        print(f"postoffice: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("ok")
    return 0
