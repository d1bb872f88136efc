"""The ``postoffice`` command line (also ``python -m postoffice``).

Thin by design: it parses arguments, loads the config, and calls the
account store, ``check`` or ``app.serve``.  Each command group is added by
one ``_add_*_parser(subparsers)`` function; a leaf parser sets
``handler=fn`` with ``fn(args, settings) -> int`` (the exit status).  The
queue group comes from ``postoffice.delivery.queue_cli.add_queue_parser``
under the same contract, when that module is installed.

Every parser (the queue's too) is a ``_Parser``, which adds ``-c/--config``
to itself, so ``postoffice -c X user list`` and ``postoffice user list -c X``
both work.  Exit status: 0 ok, 1 refused or failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from typing import Any

from postoffice import __version__
from postoffice.config.settings import ConfigError, Settings, find_config, load_settings
from postoffice.mail.address import (
    Address,
    AddressError,
    normalise_domain,
    parse_address,
    parse_mailbox,
)
from postoffice.storage.accounts import AccountError
from postoffice.storage.sqlite_accounts import SqliteAccountStore

Handler = Callable[[argparse.Namespace, Settings], int]
Subparsers = Any  # argparse's _SubParsersAction is private; typing it buys nothing

CONFIG_HELP = (
    "config file (default: $POSTOFFICE_CONFIG, else ./postoffice.toml if present,"
    " else built-in defaults)"
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


def _group(subparsers: Subparsers, name: str, summary: str, epilog: str) -> Subparsers:
    """A command group (``user``, ``domain``...) whose bare form prints its help."""
    parser = subparsers.add_parser(name, help=summary, description=summary, epilog=epilog)
    parser.set_defaults(handler=None, help_parser=parser)
    return parser.add_subparsers(title="commands", metavar="COMMAND")


def _leaf(
    subparsers: Subparsers, name: str, summary: str, handler: Handler, epilog: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=summary, epilog=epilog
    )
    parser.set_defaults(handler=handler)
    return parser


# --- accounts helpers -----------------------------------------------------------------
def _store(settings: Settings) -> SqliteAccountStore:
    """The account store, creating the data dir (mode 0700) on first use."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.mail_dir.mkdir(exist_ok=True, mode=0o700)
    return SqliteAccountStore(settings.accounts_db, config_domains=settings.domains)


def _read_password(args: argparse.Namespace, prompt: str) -> str:
    if args.password_stdin:
        text = sys.stdin.read()
        # One trailing newline is the line's end, not part of the password.
        password = text[:-1] if text.endswith("\n") else text
        password = password[:-1] if password.endswith("\r") else password
    else:
        password = getpass.getpass(f"{prompt}: ")
        if password and getpass.getpass(f"{prompt} (again): ") != password:
            raise AccountError("the passwords do not match")
    if not password:
        raise AccountError("refusing an empty password")
    # POP3 PASS and SMTP AUTH are line-based: such a password could never log in.
    if any(c in password for c in "\r\n\x00"):
        raise AccountError("a password cannot contain line breaks or NUL")
    return password


def _hash(password: str) -> str:
    from postoffice.policy.auth import PasswordHasher  # argon2 import is slowish

    return PasswordHasher().hash(password)


# --- user -----------------------------------------------------------------------------
def _user_add(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.storage.maildir import ensure_maildir, mailbox_path

    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        # Refuse before asking for a password; add_user checks again atomically.
        if not store.is_local_domain(address.domain):
            raise AccountError(
                f"{address.domain} is not a local domain; add it with:"
                f" postoffice domain add {address.domain}"
            )
        if store.password_hash(address) is not None:
            raise AccountError(f"user {address} exists already")
        if str(address) in store.list_aliases():
            raise AccountError(f"{address} is an alias; remove the alias first")
        store.add_user(address, _hash(_read_password(args, f"Password for {address}")))
    maildir = mailbox_path(settings.mail_dir, address)
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
        store.set_password(address, _hash(_read_password(args, f"New password for {address}")))
    print(f"changed the password of {address}")
    return 0


def _user_remove(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.storage.maildir import mailbox_path

    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        store.remove_user(address)
    maildir = mailbox_path(settings.mail_dir, address)
    print(f"removed user {address}; its Maildir {maildir} is kept (delete it yourself)")
    return 0


def _user_list(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.accounts_db.exists():
        return 0  # nothing stored yet; a read must not create the data dir
    with closing(_store(settings)) as store:
        for user in store.list_users():
            print(_quota_report(settings, user, store.quota(user)) if args.quota else user)
    return 0


def _user_quota(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.storage.quota import format_size, parse_size

    address = parse_mailbox(args.address)
    with closing(_store(settings)) as store:
        if store.password_hash(address) is None:
            raise AccountError(f"no such user: {address}")
        if args.size is None:
            own = store.quota(address)
        else:
            word = args.size.strip().lower()
            try:
                own = None if word == "default" else 0 if word == "none" else parse_size(word)
            except ValueError as exc:
                raise AccountError(str(exc)) from None
            store.set_quota(address, own)
            shown = "the default" if own is None else "none" if own == 0 else format_size(own)
            print(f"set the quota of {address}: {shown}")
    print(_quota_report(settings, address, own))
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
        "  echo 'secret' | postoffice user add alice@example.test --password-stdin\n"
        "  postoffice user passwd alice@example.test\n"
        "  postoffice user quota alice@example.test 500M\n"
        "  postoffice user list\n",
    )
    stdin_help = "read the password from standard input (one line) instead of prompting"
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
    passwd = _leaf(
        users,
        "passwd",
        "change a user's password",
        _user_passwd,
        "examples:\n  postoffice user passwd alice@example.test\n",
    )
    passwd.add_argument("address", metavar="ADDRESS", help="the user's address")
    passwd.add_argument("--password-stdin", action="store_true", help=stdin_help)
    remove = _leaf(
        users,
        "remove",
        "remove a user (its Maildir and mail are kept on disk)",
        _user_remove,
        "examples:\n  postoffice user remove alice@example.test\n",
    )
    remove.add_argument("address", metavar="ADDRESS", help="the user's address")
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
    if settings.accounts_db.exists():
        with closing(_store(settings)) as store:
            stored = store.list_domains()
    for name in sorted(set(stored) | set(settings.domains)):
        print(f"{name}  (config file)" if name in settings.domains else name)
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
    targets = [parse_address(t.strip(), utf8=True) for t in args.targets]
    with closing(_store(settings)) as store:
        store.add_alias(args.alias, targets)
        # A local target that is nobody is dropped at delivery: say so now.
        for target in targets:
            found = store.resolve(target)
            if found is not None and not found.exists:
                print(
                    f"postoffice: warning: {target} is not a user or alias (yet);"
                    " mail for it will be dropped",
                    file=sys.stderr,
                )
    print(f"added alias {args.alias} -> {', '.join(str(t) for t in targets)}")
    return 0


def _alias_remove(args: argparse.Namespace, settings: Settings) -> int:
    with closing(_store(settings)) as store:
        store.remove_alias(args.alias)
    print(f"removed alias {args.alias}")
    return 0


def _alias_list(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.accounts_db.exists():
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


# --- serve, check, queue --------------------------------------------------------------
def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.app import serve  # the whole server: only loaded when it runs

    return serve(settings)


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.check import run_check

    return run_check(settings)


def _add_serve_parser(subparsers: Subparsers) -> None:
    _leaf(
        subparsers,
        "serve",
        "run the mail server in the foreground (SMTP, submission, POP3, delivery queue)",
        _serve,
        "Stops on SIGTERM or Ctrl-C: no new connections, open sessions get\n"
        "[limits] shutdown_grace seconds to finish.\n\n"
        "examples:\n"
        "  postoffice serve                       # built-in defaults, 127.0.0.1 only\n"
        "  postoffice serve -c /etc/postoffice.toml\n",
    )


def _add_check_parser(subparsers: Subparsers) -> None:
    _leaf(
        subparsers,
        "check",
        "validate the config, data dir, TLS files and accounts database",
        _check,
        "Exit status: 0 all good, 1 a problem (each is printed), 2 a config error.\n\n"
        "example:\n  postoffice check -c /etc/postoffice.toml\n",
    )


def _add_queue_parser(subparsers: Subparsers) -> None:
    try:
        queue_cli = importlib.import_module("postoffice.delivery.queue_cli")
    except ImportError:
        return  # not part of this build
    queue_cli.add_queue_parser(subparsers)


# --- dkim, doctor ---------------------------------------------------------------------
def _print_dkim_records(keys: Sequence[Any]) -> None:
    from postoffice.policy.dkim_keys import txt_record, zone_txt

    for key in keys:
        print(zone_txt(key.dns_name, txt_record(key)))


def _dkim_generate(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.policy.dkim_keys import DkimKeyError, generate

    try:
        keys = generate(settings.data_dir, args.domain, rotate=args.rotate)
    except DkimKeyError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    domain = keys[0].domain
    selectors = ", ".join(f"{k.selector} ({k.algorithm})" for k in keys)
    print(f"made DKIM keys for {domain}: {selectors}, in {keys[0].path.parent}")
    print("Publish these TXT records (zone-file lines):")
    _print_dkim_records(keys)
    print(
        f"A running server signs {domain}'s mail with them from the next message on;"
        f" check the records with: postoffice doctor {domain}"
    )
    return 0


def _dkim_show(args: argparse.Namespace, settings: Settings) -> int:
    from postoffice.policy.dkim_keys import DkimKeyError, load_keys

    try:
        keys = load_keys(settings.data_dir, args.domain)
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
        "its own selector, stored under data_dir/dkim/<domain>/.\n\n"
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
    from postoffice.doctor import run_doctor

    if args.domain:
        domains = [normalise_domain(args.domain.strip())]
    else:
        stored: list[str] = []
        if settings.accounts_db.exists():
            with closing(_store(settings)) as store:
                stored = store.list_domains()
        domains = sorted(set(settings.domains) | set(stored))
    return run_doctor(settings, domains)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="postoffice",
        description="postoffice: a mail server. SMTP in, Maildir storage, MX relay out, POP3.",
        epilog="first steps:\n"
        "  postoffice serve                            # run with built-in defaults\n"
        "  postoffice user add you@localhost           # in another terminal\n"
        "  postoffice check -c postoffice.toml         # validate a config\n\n"
        "Every command takes -c PATH; `postoffice COMMAND --help` explains each.",
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
        _add_dkim_parser,
        _add_check_parser,
        _add_doctor_parser,
    ):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler | None = args.handler
    if handler is None:  # a bare group: show what it offers
        args.help_parser.print_help(sys.stderr)
        return 2
    try:
        settings = load_settings(find_config(getattr(args, "config", None)))
    except ConfigError as exc:
        print(f"postoffice: {exc}", file=sys.stderr)  # "<file>: <key>: <reason>"
        return 2
    try:
        return handler(args, settings)
    except (AccountError, AddressError) as exc:
        print(f"postoffice: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the data dir cannot be created
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"postoffice: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
