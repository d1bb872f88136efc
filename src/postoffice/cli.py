"""The ``postoffice`` command line (also ``python -m postoffice``).

Thin by design: it parses arguments, loads the config, and calls the
account store, ``check`` or ``app.serve``.  Each command group is added by
one ``_add_*_parser(subparsers)`` function; a leaf parser sets
``handler=fn`` with ``fn(args, settings) -> int`` (the exit status).  The
queue group comes from ``postoffice.delivery.queue_cli.add_queue_parser``
under the same contract, when that module is installed.

Every parser (the queue's too) is a ``_Parser``, which adds ``-c/--config``
to itself, so ``postoffice -c X user list`` and ``postoffice user list -c X``
both work.  Exit status: 0 ok, 1 refused or failed, 2 usage or config error,
141 the reader of the output went away (``| head``).

Only ``serve`` and ``init`` make a data directory; every other command whose
data directory does not exist is refused, saying which config it found (and
how), and which servers run on this machine where (datadir.py): the usual
cause is a command run from another directory than the server's.

Run as root on a data directory that belongs to another user (the service
user), every command but ``serve`` becomes that user (``Owner.become``) right
after the config is loaded, before it touches the data directory: what it
makes is that user's, and whatever that user put in the directory (a symlink
to /etc, say) cannot make root act for it.  What only root can read outside
the data directory (the config file, a [tls] certificate or key, the ports
``check`` binds) is read first.  Run as root, a config file owned by anyone
but root (or the sudo user), or writable by others, is refused: it decides
where root writes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from postoffice import __version__
from postoffice.cluster.stores import open_accounts
from postoffice.config.settings import (
    DEFAULT_CONFIG_NAME,
    ConfigError,
    Settings,
    config_origin,
    find_config,
    load_settings,
    trusted_config_owners,
)
from postoffice.datadir import Owner, running_servers
from postoffice.mail.address import (
    Address,
    AddressError,
    normalise_domain,
    parse_mailbox,
)
from postoffice.storage.accounts import AccountError, AccountStore

Handler = Callable[[argparse.Namespace, Settings], int]
Subparsers = Any  # argparse's _SubParsersAction is private; typing it buys nothing

CONFIG_HELP = (
    "config file (default: $POSTOFFICE_CONFIG, else ./postoffice.toml if present,"
    " else /etc/postoffice/postoffice.toml if present, else built-in defaults)"
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that accepts ``-c`` at every level and keeps examples as written.

    Subparsers are built with the parent's class, so groups added by other
    modules get ``-c`` too.  SUPPRESS keeps an absent ``-c`` after the
    subcommand from overwriting one given before it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("conflict_handler", "resolve")  # a group may define its own -c
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help=CONFIG_HELP
        )
        # The innermost parser's default wins: every command knows its name,
        # those of groups added by other modules (queue) too.
        self.set_defaults(command=self.prog)


def _group(subparsers: Subparsers, name: str, summary: str, epilog: str) -> Subparsers:
    """A command group (``user``, ``domain``...) whose bare form prints its help."""
    parser = subparsers.add_parser(name, help=summary, description=summary, epilog=epilog)
    parser.set_defaults(handler=None, help_parser=parser)
    return parser.add_subparsers(title="commands", metavar="COMMAND")


def _leaf(
    subparsers: Subparsers,
    name: str,
    summary: str,
    handler: Handler,
    epilog: str = "",
    *,
    needs_data_dir: bool = True,
) -> argparse.ArgumentParser:
    """A command.  Only serve and init (which make the data directory) and
    check (which changes nothing) run without an existing one: any other
    command run with the wrong config would quietly start a second one."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=summary, epilog=epilog
    )
    parser.set_defaults(handler=handler, needs_data_dir=needs_data_dir)
    return parser


# --- accounts helpers -----------------------------------------------------------------
def _store(settings: Settings) -> AccountStore:
    """The account store: in the existing data dir (``main`` checked it is
    there), or the [cluster] database."""
    settings.mail_dir.mkdir(exist_ok=True, mode=0o700)
    return open_accounts(settings, follow=False)


def _has_accounts(settings: Settings) -> bool:
    """Whether there is a store to read (a read creates no SQLite file)."""
    return settings.cluster.enabled or settings.accounts_db.exists()


def _ask(prompt: str) -> str:
    """One password from the terminal, not echoed; AccountError without one."""
    try:
        # getpass falls back to reading stdin, echoing, when there is no
        # terminal: refuse instead, and say how to give the password.
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise AccountError(
            "no terminal to ask for the password on; give it on standard input"
            " with --password-stdin"
        ) from None
    try:
        return getpass.getpass(f"{prompt}: ")
    except EOFError:  # Ctrl-D
        print(file=sys.stderr)
        raise AccountError("no password given; nothing changed") from None


def _read_password(args: argparse.Namespace, prompt: str, owner: Address) -> str:
    from postoffice.policy.account_changes import check_password

    if args.password_stdin:
        text = sys.stdin.read()
        # One trailing newline is the line's end, not part of the password.
        password = text[:-1] if text.endswith("\n") else text
        password = password[:-1] if password.endswith("\r") else password
    else:
        password = _ask(prompt)
        if password and _ask(f"{prompt} (again)") != password:
            raise AccountError("the passwords do not match")
    try:
        return check_password(password, owner, allow_weak=args.allow_weak)
    except AccountError as exc:
        if str(exc).startswith("refusing a weak password"):
            raise AccountError(f"{exc} (--allow-weak takes it anyway, for tests)") from None
        raise


def _hash(password: str) -> str:
    from postoffice.policy.auth import PasswordHasher  # argon2 import is slowish

    return PasswordHasher().hash(password)


# --- user -----------------------------------------------------------------------------
def _user_add(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.policy.account_changes import check_new_user
    from postoffice.storage.maildir import ensure_maildir

    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        # Refuse before asking for a password; add_user checks again atomically.
        maildir = check_new_user(settings, store, address, reuse_maildir=args.reuse_maildir)
        password = _read_password(args, f"Password for {address}", address)
        store.add_user(address, _hash(password))
    try:
        ensure_maildir(maildir)
    except OSError as exc:
        print(f"added user {address}", file=sys.stdout)
        print(
            f"postoffice: cannot create its Maildir {maildir}: {exc.strerror};"
            " the server will try again on first delivery",
            file=sys.stderr,
        )
        return 1
    print(f"added user {address} (Maildir {maildir})")
    return 0


def _user_passwd(args: argparse.Namespace, settings: Settings) -> int:
    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        if store.password_hash(address) is None:
            raise AccountError(f"no such user: {address}")
        password = _read_password(args, f"New password for {address}", address)
        store.set_password(address, _hash(password))
    print(f"changed the password of {address}")
    return 0


def _user_remove(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.policy.account_changes import remove_user

    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        done = remove_user(settings, store, address, force=args.force, delete_mail=args.delete_mail)
    for line in done:
        print(line)
    return 0


def _user_list(args: argparse.Namespace, settings: Settings) -> int:
    if not _has_accounts(settings):
        return 0  # nothing stored yet; a read creates nothing
    with closing(_store(settings)) as store:
        for user in store.list_users():
            print(_quota_report(settings, user, store.quota(user)) if args.quota else user)
    return 0


def _user_quota(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.policy.account_changes import set_quota

    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        if store.password_hash(address) is None:
            raise AccountError(f"no such user: {address}")
        if args.size is None:
            own = store.quota(address)
        else:
            own, done = set_quota(store, address, args.size)
            print(done)
    print(_quota_report(settings, address, own))
    return 0


def _user_admin(args: argparse.Namespace, settings: Settings) -> int:
    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        store.set_admin(address, not args.off)  # refuses an unknown user
    if args.off:
        print(f"{address} is no longer an admin")
    else:
        print(f"{address} is an admin: it may use the admin web pages (/admin)")
    return 0


def _quota_report(settings: Settings, address: Address, own: int | None) -> str:
    """One line: what the mailbox holds and its quota (recounted if in doubt)."""
    from postoffice.storage.maildir import mailbox_path
    from postoffice.storage.quota import format_size, usage_blocking

    limit = settings.limits.mailbox_quota if own is None else own
    usage = usage_blocking(mailbox_path(settings.mail_dir, address), limit)
    held = f"{address}: {usage.bytes} bytes in {usage.messages} messages"
    source = "the default, [limits] mailbox_quota" if own is None else "its own"
    if limit <= 0:
        return f"{held}; no quota ({source})"
    percent = min(100, usage.bytes * 100 // limit)
    full = ", FULL" if usage.bytes >= limit else ""
    return f"{held}; quota {limit} bytes ({format_size(limit)}, {source}): {percent}% used{full}"


def _add_user_parser(subparsers: Subparsers) -> None:
    users = _group(
        subparsers,
        "user",
        "manage mailboxes (users who receive mail and log in over POP3 and submission)",
        "examples:\n"
        "  postoffice user add alice@example.test\n"
        "  echo 'correct-horse-battery' | postoffice user add alice@example.test --password-stdin\n"
        "  postoffice user passwd alice@example.test\n"
        "  postoffice user quota alice@example.test 500M\n"
        "  postoffice user list\n",
    )
    stdin_help = "read the password from standard input (one line) instead of prompting"
    weak_help = (
        "accept a short (under 8 characters), blank or same-as-the-name password (tests only)"
    )
    add = _leaf(
        users,
        "add",
        "add a user and create its Maildir; the password is asked for twice",
        _user_add,
        "The domain must be local (in the config's domains, or added with"
        " `postoffice domain add`).\n\n"
        "examples:\n"
        "  postoffice user add alice@example.test\n"
        "  printf '%s\\n' \"$PW\" | postoffice user add alice@example.test --password-stdin\n",
    )
    add.add_argument(
        "address", metavar="ADDRESS", help="the user's address, e.g. alice@example.test"
    )
    add.add_argument("--password-stdin", action="store_true", help=stdin_help)
    add.add_argument("--allow-weak", action="store_true", help=weak_help)
    add.add_argument(
        "--reuse-maildir",
        action="store_true",
        help="give the new user the messages already in a Maildir of that name",
    )
    passwd = _leaf(
        users,
        "passwd",
        "change a user's password",
        _user_passwd,
        "examples:\n  postoffice user passwd alice@example.test\n",
    )
    passwd.add_argument("address", metavar="ADDRESS", help="the user's address")
    passwd.add_argument("--password-stdin", action="store_true", help=stdin_help)
    passwd.add_argument("--allow-weak", action="store_true", help=weak_help)
    remove = _leaf(
        users,
        "remove",
        "remove a user; its Maildir is moved to data_dir/removed/ (or deleted)",
        _user_remove,
        "A user that aliases deliver to is not removed unless --force is given; then\n"
        "it is taken out of those aliases too.  Its Maildir is moved aside, so a user\n"
        "added later under the same name starts with an empty mailbox.\n\n"
        "examples:\n"
        "  postoffice user remove alice@example.test\n"
        "  postoffice user remove alice@example.test --force --delete-mail\n",
    )
    remove.add_argument("address", metavar="ADDRESS", help="the user's address")
    remove.add_argument(
        "--force", action="store_true", help="also take the user out of aliases that name it"
    )
    remove.add_argument(
        "--delete-mail", action="store_true", help="delete its Maildir instead of moving it aside"
    )
    listing = _leaf(users, "list", "list users, one address a line", _user_list)
    listing.add_argument("--quota", action="store_true", help="with each mailbox's usage and quota")
    quota = _leaf(
        users,
        "quota",
        "show a mailbox's usage and quota, or set its quota",
        _user_quota,
        "SIZE is bytes, or a number with K, M, G or T (powers of 1024): 500M, 2G.\n"
        "'none' (or 0): no quota for this mailbox; 'default': [limits] mailbox_quota.\n"
        "A full mailbox gets 452 4.2.2 at RCPT; a message that would pass the quota,\n"
        "552 5.2.2 after its data.  A running server applies changes at once.\n\n"
        "examples:\n"
        "  postoffice user quota alice@example.test          # usage and quota\n"
        "  postoffice user quota alice@example.test 2G\n"
        "  postoffice user quota alice@example.test none\n"
        "  postoffice user quota alice@example.test default\n",
    )
    quota.add_argument("address", metavar="ADDRESS", help="the user's address")
    quota.add_argument(
        "size", metavar="SIZE", nargs="?", help="the new quota (absent: show usage and quota)"
    )
    admin = _leaf(
        users,
        "admin",
        "let a user use the admin web pages (docs/web.md), or with --off no longer",
        _user_admin,
        "A session already logged in loses the admin pages at its next request.\n\n"
        "examples:\n"
        "  postoffice user admin alice@example.test\n"
        "  postoffice user admin alice@example.test --off\n",
    )
    admin.add_argument("address", metavar="ADDRESS", help="the user's address")
    admin.add_argument("--off", action="store_true", help="take the admin flag away")


# --- domain ---------------------------------------------------------------------------
def _domain_add(args: argparse.Namespace, settings: Settings) -> int:
    with closing(_store(settings)) as store:
        store.add_domain(args.name)
    name = normalise_domain(args.name.strip())
    print(f"added domain {name}")
    # Postmaster is per domain (RFC 5321 §4.5.1); until it exists, its mail is deferred.
    print(f"next: postoffice alias add postmaster@{name} ADDRESS", file=sys.stderr)
    return 0


def _domain_remove(args: argparse.Namespace, settings: Settings) -> int:
    with closing(_store(settings)) as store:
        store.remove_domain(args.name)
    print(f"removed domain {normalise_domain(args.name.strip())}")
    return 0


def _domain_list(args: argparse.Namespace, settings: Settings) -> int:
    stored: list[str] = []
    if _has_accounts(settings):
        with closing(_store(settings)) as store:
            stored = store.list_domains()
    # Domains that come with the config: from its file, or the built-in default.
    origin = "(built-in default)" if settings.source.startswith("<") else "(config file)"
    for name in sorted(set(stored) | set(settings.domains)):
        print(f"{name}  {origin}" if name in settings.domains else name)
    return 0


def _add_domain_parser(subparsers: Subparsers) -> None:
    domains = _group(
        subparsers,
        "domain",
        "manage local domains (mail for them is delivered here, not relayed)",
        "Domains listed in the config file are local too; `domain list` marks them.\n\n"
        "examples:\n"
        "  postoffice domain add example.org\n"
        "  postoffice domain list\n"
        "  postoffice domain remove example.org\n",
    )
    for name, summary, handler in (
        ("add", "make a domain local", _domain_add),
        (
            "remove",
            "stop treating a domain as local (it must have no users or aliases)",
            _domain_remove,
        ),
    ):
        leaf = _leaf(
            domains, name, summary, handler, f"example:\n  postoffice domain {name} example.org\n"
        )
        leaf.add_argument("name", metavar="NAME", help="the domain, e.g. example.org")
    _leaf(domains, "list", "list local domains", _domain_list)


# --- alias ----------------------------------------------------------------------------
def _alias_add(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.policy.account_changes import add_alias, parse_targets

    targets = parse_targets(args.targets)
    with closing(_store(settings)) as store:
        warnings = add_alias(store, args.alias, targets)
    for warning in warnings:
        print(f"postoffice: warning: {warning}", file=sys.stderr)
    print(f"added alias {args.alias} -> {', '.join(str(t) for t in targets)}")
    return 0


def _alias_remove(args: argparse.Namespace, settings: Settings) -> int:
    with closing(_store(settings)) as store:
        store.remove_alias(args.alias)
    print(f"removed alias {args.alias}")
    return 0


def _alias_list(args: argparse.Namespace, settings: Settings) -> int:
    if not _has_accounts(settings):
        return 0
    with closing(_store(settings)) as store:
        for alias, targets in store.list_aliases().items():
            print(f"{alias} -> {', '.join(str(t) for t in targets)}")
    return 0


def _add_alias_parser(subparsers: Subparsers) -> None:
    aliases = _group(
        subparsers,
        "alias",
        "manage aliases (addresses that forward to local users or remote addresses)",
        "An alias is local@domain, or @domain to catch all otherwise unknown\n"
        "addresses of that domain; its domain must be local.  Every domain should\n"
        "have a postmaster (RFC 5321 section 4.5.1).\n\n"
        "examples:\n"
        "  postoffice alias add postmaster@example.test alice@example.test\n"
        "  postoffice alias add team@example.test alice@example.test bob@elsewhere.test\n"
        "  postoffice alias add @example.test alice@example.test\n"
        "  postoffice alias list\n",
    )
    add = _leaf(
        aliases,
        "add",
        "add an alias forwarding to one or more addresses",
        _alias_add,
        "examples:\n"
        "  postoffice alias add postmaster@example.test alice@example.test\n"
        "  postoffice alias add @example.test alice@example.test   # catch-all\n",
    )
    add.add_argument("alias", metavar="ALIAS", help="local@domain, or @domain for a catch-all")
    add.add_argument(
        "targets", metavar="TARGET", nargs="+", help="a local user or alias, or a remote address"
    )
    remove = _leaf(
        aliases,
        "remove",
        "remove an alias",
        _alias_remove,
        "example:\n  postoffice alias remove team@example.test\n",
    )
    remove.add_argument("alias", metavar="ALIAS", help="local@domain or @domain")
    _leaf(aliases, "list", "list aliases as 'alias -> targets'", _alias_list)


# --- cluster ---------------------------------------------------------------------------
def _cluster_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.cluster.dkim_move import migrate_dkim
    from postoffice.cluster.move import migrate_accounts

    url = _cluster_url(settings)
    if not settings.accounts_db.exists():
        raise AccountError(f"no embedded accounts database {settings.accounts_db} to migrate")
    for table in migrate_accounts(settings.accounts_db, url):
        print(table.line())
    print(_dkim_moved(lambda: migrate_dkim(settings.data_dir, url)))
    print(_NOT_MOVED)
    return 0


def _cluster_export(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.cluster.dkim_move import export_dkim
    from postoffice.cluster.move import export_accounts

    url = _cluster_url(settings)
    for table in export_accounts(url, settings.accounts_db):
        print(table.line())
    print(_dkim_moved(lambda: export_dkim(url, settings.data_dir)))
    print(_NOT_MOVED)
    return 0


def _dkim_moved(move: Callable[[], Any]) -> str:
    """The DKIM keys' copy line; AccountError (the command's refusal) if it failed."""
    from postoffice.policy.dkim_keys import DkimKeyError

    try:
        return str(move().line())
    except DkimKeyError as exc:
        raise AccountError(f"accounts moved, DKIM keys not: {exc}") from None


_NOT_MOVED = (
    "accounts and DKIM keys moved; mailboxes and the queue are not moved yet (docs/cluster.md)"
)


def _cluster_url(settings: Settings) -> str:
    if not settings.cluster.enabled:
        raise AccountError("the config sets no [cluster] database (docs/cluster.md)")
    return settings.cluster.database


def _add_cluster_parser(subparsers: Subparsers) -> None:
    cluster = _group(
        subparsers,
        "cluster",
        "move data between the embedded data dir and the [cluster] database",
        "Both directions copy, in one transaction, what the receiving side lacks,\n"
        "and refuse (copying nothing) when an entry differs there; run again after\n"
        "an interruption.  Each table is verified by count and SHA-256.  Today:\n"
        "accounts (domains, users with password hashes and quotas, aliases) and\n"
        "DKIM keys (data_dir/dkim/).\n\n"
        "examples:\n"
        "  postoffice cluster migrate   # data_dir/accounts.sqlite3 -> [cluster] database\n"
        "  postoffice cluster export    # [cluster] database -> data_dir/accounts.sqlite3\n",
    )
    _leaf(cluster, "migrate", "copy the embedded accounts into the database", _cluster_migrate)
    _leaf(cluster, "export", "copy the database's accounts into the data dir", _cluster_export)


# --- serve, check, queue --------------------------------------------------------------
def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.app import serve  # the whole server: only loaded when it runs

    return serve(settings)


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.check import run_check

    # Ports and [tls] files as root (serve opens them as root), the data dir as its owner.
    return run_check(settings, become_owner=lambda: _become_owner(settings))


def _init(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = settings.data_dir.absolute()
    existed = data_dir.is_dir()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _store(settings).close()  # mail/ and the accounts database
    config = "" if settings.source.startswith("<") else f" -c {Path(settings.source).absolute()}"
    print(
        f"{'data directory exists already:' if existed else 'made data directory'} {data_dir}"
        f" (config: {settings.source})"
    )
    if config:
        print(f"Every command finds it with -c: postoffice{config} ...")
    else:
        print(f"Commands run in {Path.cwd()} find it (or give them a config file with -c).")
    domain = settings.domains[0] if settings.domains else "example.test"
    print(f"Next:  postoffice{config} serve   and   postoffice{config} user add you@{domain}")
    return 0


def _reload(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.datadir import serving_pid
    from postoffice.reload import ReloadError, load

    # What the server will read, checked here first: the reason is shown now,
    # not only in the server's log.
    try:
        load(settings.source, check_only=True)
    except ReloadError as exc:
        print(f"postoffice: not reloaded, the server keeps its config: {exc}", file=sys.stderr)
        return 1
    pid = serving_pid(settings.data_dir)
    if pid is None:
        print(f"postoffice: no server runs on {settings.data_dir.absolute()}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"config {settings.source} is valid; asked the server (pid {pid}) to reload it")
    print("The server's log says what it applied (and what waits for a restart).")
    return 0


def _init_new(args: argparse.Namespace) -> int:
    """``init HOSTNAME DOMAIN``: config, data directory, first user, DKIM keys,
    and the DNS records to publish (quickstart.py)."""
    import secrets

    from postoffice.datadir import Owner
    from postoffice.doctor import records_to_publish
    from postoffice.policy.dkim_keys import generate
    from postoffice.quickstart import config_text, run_owner
    from postoffice.storage.maildir import ensure_maildir, mailbox_path
    from postoffice.storage.safeio import atomic_write

    hostname, domain = normalise_domain(args.hostname), normalise_domain(args.domain)
    address = parse_mailbox(args.user or f"postmaster@{domain}")
    if address.domain != domain:
        raise AccountError(f"the first user must be in {domain}, not {address.domain}")
    config = Path(getattr(args, "config", None) or DEFAULT_CONFIG_NAME).absolute()
    if config.exists():
        raise _Refused(f"{config} exists already; init writes a new config (or give -c PATH)")
    data_dir = Path(args.data_dir).absolute()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise _Refused(f"data directory {data_dir} exists and is not empty")
    password = _read_password(args, "", address) if args.password_stdin else None
    config.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(config, config_text(hostname, domain, data_dir, args.run_user).encode(), 0o644)
    settings = load_settings(config, trusted_owners=trusted_config_owners())
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = run_owner(settings.run)  # root: the data is the service user's
    if owner is not None:
        os.chown(data_dir, owner.uid, owner.gid)
        _become_owner(settings)
    generated = password is None
    password = password or secrets.token_urlsafe(15)
    with closing(_store(settings)) as store:
        store.add_user(address, _hash(password))
    ensure_maildir(mailbox_path(settings.mail_dir, address))
    keys = generate(settings.data_dir, domain)
    print(f"wrote {config}")
    print(
        f"made data directory {data_dir}"
        + (f" (owned by {Owner.of(data_dir).name})" if owner else "")
    )
    print(f"added user {address}" + (f" with password: {password}" if generated else ""))
    if generated:
        print("  (shown only this once: note it, or set another with `postoffice user passwd`)")
    print(
        f"made DKIM keys for {domain}: " + ", ".join(f"{k.selector} ({k.algorithm})" for k in keys)
    )
    print()
    print("Publish these DNS records (zone-file lines), then check them with:")
    print(f"  postoffice -c {config} doctor")
    print(f"{hostname}. IN A <this server's public IPv4 address>")
    print(f"  (and AAAA for IPv6; the PTR of each address names {hostname})")
    for line in records_to_publish(hostname, domain, keys, settings.listen, settings.mta_sts):
        print(line)
    print()
    print(f"Then start it (as root: it binds the ports, then runs as {settings.run.user}):")
    print(f"  postoffice -c {config} serve")
    return 0


def _add_serve_parser(subparsers: Subparsers) -> None:
    _leaf(
        subparsers,
        "serve",
        "run the mail server in the foreground (SMTP, submission, POP3, delivery queue)",
        _serve,
        "Stops on SIGTERM or Ctrl-C: no new connections, open sessions get\n"
        "[limits] shutdown_grace seconds to finish.  SIGUSR1 reopens the log file\n"
        "([log] file, for logrotate); SIGHUP reloads the config (postoffice reload).\n"
        "One server per data directory: a second one is refused (data_dir/postoffice.pid).\n"
        "Started as root, it binds its ports, then runs as [run] user.\n\n"
        "examples:\n"
        "  postoffice serve                       # built-in defaults, 127.0.0.1 only\n"
        "  postoffice serve -c /etc/postoffice/postoffice.toml\n",
        needs_data_dir=False,
    )
    init = _leaf(
        subparsers,
        "init",
        "set up a new server (HOSTNAME DOMAIN), or make the data directory of this config",
        _init,
        "With HOSTNAME and DOMAIN: write a config for them (standard ports, -c PATH or\n"
        "./postoffice.toml), make the data directory, the first user (postmaster@DOMAIN\n"
        "or --user; its password is printed once, or read with --password-stdin) and\n"
        "the domain's DKIM keys, and print the DNS records to publish.\n\n"
        "Without them: make the data directory of the config found.  Every command but\n"
        "serve and init refuses to run without the data directory, so that one run\n"
        "with the wrong config (or from the wrong directory) says so instead of\n"
        "quietly making a second one.\n\n"
        "examples:\n"
        "  postoffice -c /etc/postoffice/postoffice.toml init mail.example.org example.org\n"
        "  postoffice init                        # ./postoffice-data, or the config's data_dir\n",
        needs_data_dir=False,
    )
    init.add_argument("hostname", metavar="HOSTNAME", nargs="?", help="this server's name")
    init.add_argument("domain", metavar="DOMAIN", nargs="?", help="the mail domain")
    init.add_argument("--user", metavar="ADDRESS", help="the first user (postmaster@DOMAIN)")
    init.add_argument(
        "--data-dir", default="/var/lib/postoffice", help="where the mail goes (%(default)s)"
    )
    init.add_argument(
        "--run-user", default="postoffice", help="[run] user of the config (%(default)s)"
    )
    init.add_argument(
        "--password-stdin", action="store_true", help="read the first user's password from stdin"
    )
    init.add_argument("--allow-weak", action="store_true", help=argparse.SUPPRESS)


def _add_reload_parser(subparsers: Subparsers) -> None:
    _leaf(
        subparsers,
        "reload",
        "check the config and certificate, then have the running server apply them",
        _reload,
        "Sends SIGHUP to the server of this data directory (data_dir/postoffice.pid)\n"
        "once the config and the TLS certificate load.  Limits, domains, relay\n"
        "settings, certificates and listen addresses apply without a restart: open\n"
        "sessions stay up; the server logs the keys that wait for a restart.\n"
        "Exit status: 0 signalled; 1 a certificate that does not load, or no server;\n"
        "2 a config error (nothing is sent either way).\n\n"
        "example:\n  postoffice reload -c /etc/postoffice/postoffice.toml\n",
    )


def _add_check_parser(subparsers: Subparsers) -> None:
    _leaf(
        subparsers,
        "check",
        "validate the config, data dir, listen addresses, TLS files and accounts database",
        _check,
        "Exit status: 0 all good, 1 a problem (each is printed), 2 a config error.\n\n"
        "example:\n  postoffice check -c /etc/postoffice/postoffice.toml\n",
        needs_data_dir=False,
    )


def _add_queue_parser(subparsers: Subparsers) -> None:
    try:
        queue_cli = importlib.import_module("postoffice.delivery.queue_cli")
    except ImportError:
        return  # not part of this build
    queue_cli.add_queue_parser(subparsers)


def _add_sieve_parser(subparsers: Subparsers) -> None:
    importlib.import_module("postoffice.delivery.sieve_cli").add_sieve_parser(subparsers)


def _add_dmarc_parser(subparsers: Subparsers) -> None:
    dmarc_reports = importlib.import_module("postoffice.delivery.dmarc_reports")
    dmarc_reports.add_dmarc_parser(subparsers)


def _add_cert_parser(subparsers: Subparsers) -> None:
    cert_status = importlib.import_module("postoffice.net.cert_status")
    cert_status.add_cert_parser(subparsers)


def _add_tlsrpt_parser(subparsers: Subparsers) -> None:
    tls_reports = importlib.import_module("postoffice.delivery.tls_reports")
    tls_reports.add_tlsrpt_parser(subparsers)


# --- dkim, doctor ---------------------------------------------------------------------
def _print_dkim_records(keys: Sequence[Any]) -> None:
    from postoffice.policy.dkim_keys import txt_record, zone_txt

    for key in keys:
        print(zone_txt(key.dns_name, txt_record(key)))


def _dkim_generate(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.cluster.stores import generate_dkim_keys
    from postoffice.policy.dkim_keys import DkimKeyError

    try:
        keys = generate_dkim_keys(settings, args.domain, rotate=args.rotate)
    except DkimKeyError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    domain = keys[0].domain
    local = set(settings.domains)
    if _has_accounts(settings):
        with closing(_store(settings)) as store:
            local |= set(store.list_domains())
    if not any(d == domain or d.endswith(f".{domain}") for d in local):
        # Only mail from local domains (or their subdomains) is signed: likely a typo.
        print(
            f"postoffice: warning: {domain} is not a local domain here (nor the parent of one):"
            f" nothing is signed with these keys until it is (postoffice domain add {domain})",
            file=sys.stderr,
        )
    selectors = ", ".join(f"{k.selector} ({k.algorithm})" for k in keys)
    where = keys[0].path.parent if keys[0].path else "the [cluster] database"
    print(f"made DKIM keys for {domain}: {selectors}, in {where}")
    print("Publish these TXT records (zone-file lines):")
    _print_dkim_records(keys)
    print(
        f"A running server signs {domain}'s mail with them from the next message on;"
        f" check the records with: postoffice doctor {domain}"
    )
    return 0


def _dkim_show(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.cluster.stores import load_dkim_keys
    from postoffice.policy.dkim_keys import DkimKeyError

    try:
        keys = load_dkim_keys(settings, args.domain)
        if not keys:
            raise DkimKeyError(
                f"{args.domain} has no DKIM keys; make them with:"
                f" postoffice dkim generate {args.domain}"
            )
        _print_dkim_records(keys)
    except DkimKeyError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_dkim_parser(subparsers: Subparsers) -> None:
    group = _group(
        subparsers,
        "dkim",
        "manage DKIM signing keys (mail submitted for a domain is signed with its keys)",
        "Each domain gets an RSA 2048 key and an Ed25519 key (RFC 8463), each with\n"
        "its own selector, stored under data_dir/dkim/<domain>/ (with [cluster]\n"
        "database: in the database, and every node signs with them).\n\n"
        "examples:\n"
        "  postoffice dkim generate example.org\n"
        "  postoffice dkim show example.org\n",
    )
    generate = _leaf(
        group,
        "generate",
        "make the keys of a domain and print the DNS records to publish",
        _dkim_generate,
        "Run it as the user the server runs as: the key files are readable only by\n"
        "their owner.  A running server uses new keys from the next message on.\n\n"
        "examples:\n"
        "  postoffice dkim generate example.org\n"
        "  postoffice dkim generate example.org --rotate   # new selectors, new keys\n",
    )
    generate.add_argument("domain", metavar="DOMAIN", help="the domain, e.g. example.org")
    generate.add_argument(
        "--rotate",
        action="store_true",
        help="replace existing keys with new ones under new selectors (publish them first:"
        " signing switches at once)",
    )
    show = _leaf(
        group,
        "show",
        "print the DNS TXT records of a domain's active keys",
        _dkim_show,
        "example:\n  postoffice dkim show example.org\n",
    )
    show.add_argument("domain", metavar="DOMAIN", help="the domain")


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.dns.resolver import DnsResolver
    from postoffice.doctor import LOOKUP_LIFETIME, check_certificate, run_doctor

    # A [tls] certificate may be readable by root only (serve reads it as root).
    certificate = check_certificate(settings) if settings.tls.cert else None
    _become_owner(settings)
    if args.domain:
        domains = [normalise_domain(args.domain.strip())]
    else:
        stored: list[str] = []
        if _has_accounts(settings):
            with closing(_store(settings)) as store:
                stored = store.list_domains()
        domains = sorted(set(settings.domains) | set(stored))
    resolver = DnsResolver(settings.relay.dns_servers, lifetime=LOOKUP_LIFETIME)
    return run_doctor(settings, resolver, domains, certificate=certificate)


def _add_doctor_parser(subparsers: Subparsers) -> None:
    doctor = _leaf(
        subparsers,
        "doctor",
        "print the DNS records a domain needs, check them, the certificate and the listeners",
        _doctor,
        "Prints MX, A/AAAA, PTR, SPF, DKIM and DMARC records as zone-file lines and\n"
        "marks each ok, missing or wrong (with the reason), looked up through\n"
        "[relay] dns_servers when set.  Run it while the server runs: it also checks\n"
        "that every listener answers.  Exit status: 0 all good, 1 something to fix.\n\n"
        "examples:\n"
        "  postoffice doctor                 # this server and every local domain\n"
        "  postoffice doctor example.org\n",
    )
    doctor.add_argument(
        "domain", metavar="DOMAIN", nargs="?", help="check only this domain (default: all local)"
    )


def _trace(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.trace import run

    return run(args, settings)


def _add_trace_parser(subparsers: Subparsers) -> None:
    parser = _leaf(
        subparsers,
        "trace",
        "a message's timeline from the mail log and the queue, by queue id or address",
        _trace,
        "Reads [log] file and the older files logrotate left beside it (name.1,\n"
        "name.2.gz, ...), text or json: received (from whom, checks), queued, each\n"
        "delivery attempt with the remote reply, bounces, the mailbox file and its\n"
        "POP3/IMAP retrieval; then what the queue still holds.  Exit status: 0 found,\n"
        "1 nothing found, 2 a bad argument.\n\n"
        "examples:\n"
        "  postoffice trace 19c4a1f2b3d4e5f6a7b\n"
        "  postoffice trace bob@example.org --since 2h\n",
    )
    parser.add_argument("what", metavar="ID|ADDRESS", help="a queue id, or an envelope address")
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only records since then: a duration (30m, 2h, 1d) or a time (2026-12-05T14:00)",
    )
    parser.add_argument(
        "--log", type=Path, metavar="FILE", help="read this log file instead of [log] file"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="postoffice",
        description="postoffice: a mail server. SMTP in, Maildir storage, MX relay out, POP3.",
        epilog="first steps:\n"
        "  postoffice serve                            # run with built-in defaults\n"
        "  postoffice user add you@localhost           # in another terminal, same directory\n"
        "  postoffice check -c postoffice.toml         # validate a config\n\n"
        "Every command takes -c PATH; without it the config is $POSTOFFICE_CONFIG,\n"
        "./postoffice.toml, /etc/postoffice/postoffice.toml or the built-in defaults\n"
        "(data in ./postoffice-data).  `postoffice COMMAND --help` explains each.",
    )
    parser.add_argument("--version", action="version", version=f"postoffice {__version__}")
    parser.set_defaults(handler=None, help_parser=parser)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (
        _add_serve_parser,
        _add_user_parser,
        _add_domain_parser,
        _add_alias_parser,
        _add_queue_parser,
        _add_sieve_parser,
        _add_dmarc_parser,
        _add_cert_parser,
        _add_tlsrpt_parser,
        _add_trace_parser,
        _add_dkim_parser,
        _add_check_parser,
        _add_reload_parser,
        _add_doctor_parser,
        _add_cluster_parser,
    ):
        add(subparsers)
    return parser


def _no_data_dir(args: argparse.Namespace, settings: Settings) -> int:
    """Refuse a command run against a data directory that does not exist, and
    help find the right one."""
    data_dir = settings.data_dir.absolute()
    command = args.command
    err = sys.stderr
    problem = "is not a directory" if data_dir.exists() else "does not exist"
    print(
        f"postoffice: data directory {data_dir} {problem}; `{command}` does not make one"
        " (only `postoffice init` and `postoffice serve` do)",
        file=err,
    )
    print(
        f"  config: {settings.source} ({config_origin(getattr(args, 'config', None))})",
        file=err,
    )
    servers = running_servers()  # none of them on ours: it does not exist
    for server in servers:
        print(f"  a server is running elsewhere: {server.describe()}", file=err)
        print(f"    to work on its data, {server.how_to_reach()}", file=err)
    print(
        "  Give the config of the data you mean with -c CONFIG (or $POSTOFFICE_CONFIG),"
        " or run from the directory that holds it.",
        file=err,
    )
    given = getattr(args, "config", None)
    config = f" -c {given}" if given else ""
    print(f"  To make a new data directory there: postoffice{config} init", file=err)
    return 1


def _os_error(exc: OSError, settings: Settings) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    line = f"postoffice: {where}{exc.strerror or exc}"
    if exc.errno == errno.EACCES:
        try:
            owner = Owner.of(settings.data_dir)
        except OSError:
            return line
        if owner.uid != os.geteuid():
            who = owner.name
            line += f" (the data directory belongs to {who}: run this as {who} or root)"
    return line


class _Refused(Exception):
    """A command cannot go on; ``str()`` is the line users see."""


# Imported before root becomes the data directory's owner: the commands import
# them lazily, and the owner may not be able to read the Python installation
# (a server running as that user can; one under /root, say, cannot).
_BEFORE_BECOMING_OWNER = (
    "postoffice.check",
    "postoffice.doctor",
    "postoffice.delivery.queue_cli",
    "postoffice.delivery.sieve_cli",
    "postoffice.delivery.dmarc_reports",
    "postoffice.net.cert_status",
    "postoffice.delivery.tls_reports",
    "postoffice.trace",
    "postoffice.policy.auth",
    "postoffice.policy.dkim_keys",
    "postoffice.policy.passwords",
    "postoffice.storage.maildir",
    "postoffice.storage.quota",
    "postoffice.storage.retired",
    # dnspython imports a record type's module when it first meets one.
    *(f"dns.rdtypes.IN.{t}" for t in ("A", "AAAA")),
    *(f"dns.rdtypes.ANY.{t}" for t in ("MX", "NS", "PTR", "TXT", "CNAME", "SOA")),
)


def _become_owner(settings: Settings) -> None:
    """Run as root on another user's data directory: become that user for the
    rest of the command (see the module doc); else nothing."""
    owner = Owner.to_become(settings.data_dir)
    if owner is None:
        return
    for name in _BEFORE_BECOMING_OWNER:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    owner.become()
    if not os.access(settings.data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise _Refused(
            f"the data directory {settings.data_dir} belongs to {owner.name}, who cannot reach"
            " it (nor can a server running as that user): let it into the directories above"
        )


def _run_init_new(args: argparse.Namespace) -> int:
    if not args.domain:
        print("postoffice: init HOSTNAME DOMAIN: give the mail domain too", file=sys.stderr)
        return 2
    try:
        return _init_new(args)
    except (AccountError, AddressError, _Refused) as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"postoffice: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def _quietly_closed_stdout() -> int:
    """Our reader went away (``| head``): stop without a word, as commands
    killed by SIGPIPE do."""
    with contextlib.suppress(OSError):
        # The interpreter flushes stdout once more at exit: let that go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # what a shell shows for a command ended by SIGPIPE (128 + 13)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler | None = args.handler
    if handler is None:  # a bare group: show what it offers
        args.help_parser.print_help(sys.stderr)
        return 2
    # Warnings of the stores (e.g. an alias member that is gone), as our own lines.
    logging.basicConfig(level=logging.WARNING, format="postoffice: %(message)s")
    if handler is _init and getattr(args, "hostname", None):  # it writes the config
        return _run_init_new(args)
    try:
        settings = load_settings(
            find_config(getattr(args, "config", None)), trusted_owners=trusted_config_owners()
        )
    except ConfigError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)  # "<file>: <key>: <reason>"
        return 2
    if getattr(args, "needs_data_dir", True) and not settings.data_dir.is_dir():
        return _no_data_dir(args, settings)
    try:
        # serve stays as it is started ([run] drops root, once it exists);
        # check and doctor read what needs root first, then call _become_owner.
        if handler not in (_serve, _check, _doctor, _reload):
            _become_owner(settings)
        code = handler(args, settings)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except (AccountError, AddressError, _Refused) as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _quietly_closed_stdout()
    except OSError as exc:  # e.g. the data dir cannot be created
        print(_os_error(exc, settings), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
