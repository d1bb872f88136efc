"""Typed settings, one frozen dataclass per TOML section, and the loader.

Each field's comment is its documentation (the README's config reference is
written from these).  The loader refuses unknown keys and bad values with the
file, the dotted key and the reason, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import ipaddress
import math
import os
import pwd
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from postoffice.mail.address import AddressError, normalise_domain

T = TypeVar("T")

CONFIG_ENV = "POSTOFFICE_CONFIG"
DEFAULT_CONFIG_NAME = "postoffice.toml"
# Looked for after ./postoffice.toml: where a packaged install keeps its config.
SYSTEM_CONFIG = Path("/etc/postoffice/postoffice.toml")
LOG_LEVEL_ENV = "POSTOFFICE_LOG_LEVEL"  # overrides [log] level (README: "Logging")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A config problem: where it is and why; ``str()`` is the line users see."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        # key "": the file as a whole (not found, not TOML), "<file>: <reason>".
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenSettings:
    # Each listener is a list of "host:port"; an empty list turns it off.
    smtp: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2525),)  # MTA-to-MTA (25)
    submission: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2587),)  # STARTTLS+AUTH
    submissions: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2465),)  # TLS+AUTH
    pop3: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2110),)  # STLS (110)
    pop3s: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2995),)  # implicit TLS (995)
    imap: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2143),)  # STARTTLS (143)
    imaps: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2993),)  # implicit TLS (993)
    # ManageSieve (RFC 5804, 4190): users edit their Sieve scripts; [] (off) unless set.
    managesieve: tuple[ListenAddress, ...] = ()
    # Prometheus text format at GET /metrics (net/metrics_http.py); [] turns it off.
    metrics: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 2900),)
    # Plain HTTP (80): redirects every request to https (net/web.py); [] turns it off.
    http: tuple[ListenAddress, ...] = ()
    # HTTPS (443) with the mail certificate: client autoconfiguration
    # (Thunderbird, autodiscover, Apple profiles: net/autoconfig.py); [] turns it off.
    https: tuple[ListenAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class TlsSettings:
    # PEM certificate chain and key; both empty: a self-signed pair in data_dir/tls.
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    # ACME (RFC 8555, net/acme.py): the CA's directory URL; "" (no [acme]):
    # [tls] files, else the self-signed pair.
    directory: str = ""
    email: str = ""  # the account's contact; "" none
    names: tuple[str, ...] = ()  # extra names; the hostname is always in the certificate
    ca_bundle: Path | None = None  # PEM to trust for the directory; None: the system store


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_message_size: int = 25 * 1024 * 1024  # bytes; advertised in EHLO SIZE, else 552
    # Bytes that must stay free on the file systems of data_dir, its Maildirs
    # and queue (Postfix's queue_minfree); below it MAIL FROM is 452 4.3.1.
    # At least 1.5 x max_message_size (Postfix's rule), with room for queue
    # state and the accounts database; 0 turns the check off.
    min_free_space: int = 100 * 1024 * 1024
    # Bytes per mailbox (files in its Maildir, counted in its maildirsize);
    # 0: none.  `postoffice user quota ADDRESS SIZE` sets one mailbox's own.
    # Full: 452 4.2.2 at RCPT; a message that would pass it: 552 5.2.2 after DATA.
    mailbox_quota: int = 0
    max_recipients: int = 100  # RCPTs per message (RFC 5321 §4.5.3.1.8 minimum); then 452
    max_connections: int = 1000  # concurrent connections per listener kind (smtp, pop3...)
    max_connections_per_ip: int = 20  # concurrent connections from one client address
    # Seconds idle waiting for a command (RFC 5321 §4.5.3.2.7), and the most a
    # write waits for a client to take our replies before it is cut off.
    smtp_timeout: float = 300.0
    smtp_data_timeout: float = 180.0  # seconds between DATA blocks (RFC 5321 §4.5.3.2.6)
    # Seconds idle (RFC 1939 §3: at least 10 minutes); also bounds each write.
    pop3_timeout: float = 600.0
    # Seconds an IMAP session may sit idle between commands (RFC 9051 §5.4:
    # the autologout timer is at least 30 minutes); also bounds each write.
    # IDLE (RFC 2177) may last twice as long before the client must renew it.
    imap_timeout: float = 1800.0
    # Errors in one SMTP session (bad commands, refused recipients, any other
    # 5xx reply) before it is closed with 421 4.7.0, right after the reply to
    # the last one, even inside a pipelined batch; a message accepted with
    # 250 starts the count again (Postfix's smtpd_hard_error_limit).  POP3
    # closes a session after this many bad commands.
    max_errors: int = 20
    # Errors after which every further SMTP reply waits error_delay seconds
    # (Postfix's smtpd_soft_error_limit and smtpd_error_sleep_time); the
    # delays of one session add up to at most smtp_timeout, then it is closed.
    soft_errors: int = 10
    error_delay: float = 1.0
    # Octets in one line of a message (header or body, without its line end).
    # Lines over 998 (RFC 5322 §2.1.1) are stored whole and folded when
    # relayed; a longer one is refused with 554 5.6.0 after the data.
    max_line_length: int = 64 * 1024
    shutdown_grace: float = 10.0  # seconds sessions get to finish on SIGTERM
    # Processes accepting on the smtp listener (they share its listening
    # socket and take turns, net/accept.py); 0: one per CPU, the default, so
    # large messages and many senders use every core.  The connection caps
    # above hold for all of them together (net/caps.py).
    smtp_processes: int = 0


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # Allow USER/PASS and AUTH without TLS when the client is on loopback.
    allow_plaintext_loopback: bool = False
    # Failed logins per (client address, account) pair before that pair's
    # further wrong passwords are answered slowly (1 s, doubling), one attempt
    # at a time.  A right password is still answered at once.
    throttle_after: int = 3
    # The longest (seconds) a login attempt is held: waiting its turn plus a
    # slowed "failed".  One that would be held longer is refused at once,
    # unchecked (SMTP 454 4.7.0, POP3 -ERR [SYS/TEMP]): try again later.
    throttle_max_delay: float = 30.0
    # Seconds over which the failure budgets below are counted; a pair's
    # failures are forgotten this long after its last one.
    throttle_window: float = 900.0
    # Failure budgets per window: at one account from all addresses, from one
    # client address (IPv6: its /64) at all accounts, and in all.  A spent
    # budget lets one more attempt through per window/budget seconds (the
    # rest wait or are refused); logins from a known-good pair are exempt.
    # 0 turns a budget off.
    throttle_account_failures: int = 10
    throttle_address_failures: int = 30
    throttle_global_failures: int = 300
    # Seconds after a successful login during which its (address, account)
    # pair is known-good (kept in memory only); 0: never.
    throttle_known_good: float = 30 * 86400.0
    # Threads that check passwords, apart from the I/O threads; 0: one fewer
    # than the CPUs, at least 1.
    hash_workers: int = 0


@dataclass(frozen=True, slots=True)
class RelaySettings:
    mx_port: int = 25  # port used on MX hosts (tests move it)
    dns_servers: tuple[ListenAddress, ...] = ()  # empty: the system resolver
    smarthost: ListenAddress | None = None  # send all outbound mail there instead of MX
    # Delays in seconds between delivery attempts; the last repeats until give_up_after.
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    give_up_after: float = 5 * 24 * 3600.0  # seconds in the queue before a bounce
    warn_after: float = 4 * 3600.0  # seconds before a "delayed" DSN is sent; 0 turns it off
    max_per_destination: int = 4  # concurrent connections to one destination domain
    max_deliveries: int = 50  # concurrent outbound SMTP connections in all
    connect_timeout: float = 30.0  # seconds to open a connection to an MX
    # Outbound TLS where no MTA-STS or DANE policy says more: "opportunistic"
    # (STARTTLS when offered, unverified), "verify" (STARTTLS required, the
    # certificate verified for the MX host name, else the mail waits) or
    # "dane-only" (mail waits unless DANE applies).  delivery/tls_policy.py.
    tls: str = "opportunistic"
    # Extra CAs (PEM) trusted for outbound TLS and MTA-STS policy fetches,
    # on top of the system store; "": the system store only.
    ca_file: str = ""
    mta_sts_port: int = 443  # port of https://mta-sts.<domain>/ (tests move it)


@dataclass(frozen=True, slots=True)
class CheckSettings:
    # Clients here are local: no reverse DNS, no SPF/DKIM/DMARC lookups or
    # verdicts for them.  This grants NO relay rights: relaying needs AUTH.
    exempt_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # Refuse (550 5.7.1, at the end of DATA) mail that fails DMARC for a domain
    # whose policy is p=reject (RFC 7489 §6.6.4); false: only record the failure
    # in Authentication-Results.  Other failures are always only recorded.
    dmarc_reject: bool = True


@dataclass(frozen=True, slots=True)
class LogSettings:
    # Line format: "text" (one line per event: ISO 8601 time with its UTC
    # offset, postoffice[PID], level, logger, message of key=value fields) or
    # "json" (one JSON object per line; mail events with their fields as members).
    format: str = "text"
    # The least severe level logged: "debug", "info", "warning" or "error";
    # $POSTOFFICE_LOG_LEVEL, when set, overrides it.
    level: str = "info"
    # Append the log to this file too, reopened on SIGUSR1 (for logrotate).
    file: Path | None = None
    # Send the log to syslog (journald or rsyslog) through this socket, with
    # facility "mail", e.g. "/dev/log"; "" does not.
    syslog: str = ""
    # With ``file`` or ``syslog`` set, nothing goes to standard error.


@dataclass(frozen=True, slots=True)
class RunSettings:
    # Started as root, `serve` binds its listeners, then becomes this user
    # (its groups, this group) for good.  With the default, and no such user
    # on the system, it stays root only with allow_root = true.
    user: str = "postoffice"
    group: str = ""  # "": the user's own (primary) group
    allow_root: bool = False  # handle mail as root when `user` does not exist


MTA_STS_MODES = ("none", "testing", "enforce")
MTA_STS_MAX_AGE = 31557600  # RFC 8461 §3.2: max_age is at most 31557600 seconds (a year)


@dataclass(frozen=True, slots=True)
class MtaStsSettings:
    # Our own MTA-STS policy (RFC 8461), served on [listen] https at
    # https://mta-sts.<domain>/.well-known/mta-sts.txt for each local domain:
    # "none" (no policy; served so senders drop one they cached), "testing"
    # (senders report failures, deliver anyway) or "enforce".
    mode: str = "none"
    max_age: int = 604800  # seconds senders may cache the policy (a week)


@dataclass(frozen=True, slots=True)
class WebSettings:
    # The admin and account pages on [listen] https (docs/web.md).  Admin
    # pages (/admin) answer only clients in these networks; empty: any
    # client (a login as a user flagged admin is needed all the same).
    admin_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


FILTER_ACTIONS = ("tempfail", "accept", "reject")


@dataclass(frozen=True, slots=True)
class MilterSettings:
    # "inet:HOST:PORT" (IPv6: "inet6:[::1]:PORT" or "inet:[::1]:PORT") or "unix:/path".
    address: str
    # What a failure or timeout of this milter gives: "tempfail" (451 4.7.1),
    # "accept" (as if it were not there) or "reject" (550 5.7.1); the
    # [filters] default_action unless given.
    default_action: str = "tempfail"
    connect_timeout: float = 5.0  # seconds to connect and negotiate
    command_timeout: float = 10.0  # seconds per stage (connect ... body chunk)
    eom_timeout: float = 60.0  # seconds for the end-of-message answer


@dataclass(frozen=True, slots=True)
class FilterSettings:
    # Milters (docs/filters.md), asked in this order before the Python hooks;
    # each a string ("inet:127.0.0.1:11332", "unix:/run/rspamd/milter.sock")
    # or a table {address, default_action, connect_timeout, command_timeout,
    # eom_timeout}.
    milters: tuple[MilterSettings, ...] = ()
    # Python hooks, "package.module:Class", importable by the server; each
    # class is instantiated once at start (filters/hooks.py).
    hooks: tuple[str, ...] = ()
    # What a failing filter gives unless its own table says otherwise.
    default_action: str = "tempfail"
    hook_timeout: float = 30.0  # seconds each hook stage may take
    # Local copies of mail a filter marks as spam (X-Spam: Yes, rspamd's
    # "add header"/"rewrite subject" action) go to the Junk folder.
    junk_folder: bool = True
    # rspamd controller URL ("http://127.0.0.1:11334") for learning from
    # IMAP moves into and out of Junk; "" off.
    rspamd_controller: str = ""

    @property
    def enabled(self) -> bool:
        """True when a filter is configured (the spooled SMTP path is used)."""
        return bool(self.milters or self.hooks)


CLUSTER_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    # Several nodes on one PostgreSQL (docs/cluster.md): a libpq connection
    # URI, "postgresql://user@host:5432/postoffice" (a password is best kept
    # in ~/.pgpass or $PGPASSFILE, not here).  "": the embedded SQLite store.
    # Needs the [cluster] extra: pip install 'postoffice[cluster]'.
    database: str = ""
    # Seconds a node's claim on a queued message lasts unless renewed (it is,
    # every third of it, while the delivery runs): a node that dies leaves
    # its messages to the others after this.  Keep it well above the SMTP
    # timeouts (docs/cluster.md, "The outbound queue").
    queue_lease: float = 900.0

    @property
    def enabled(self) -> bool:
        return bool(self.database)


@dataclass(frozen=True, slots=True)
class Settings:
    hostname: str = "localhost"  # banner, EHLO name, Received headers
    data_dir: Path = Path("./postoffice-data")  # accounts, Maildirs, queue, TLS
    domains: tuple[str, ...] = ("localhost",)  # local domains (the CLI can add more)
    source: str = "<built-in defaults>"  # where these settings came from
    listen: ListenSettings = field(default_factory=ListenSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    acme: AcmeSettings = field(default_factory=AcmeSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    log: LogSettings = field(default_factory=LogSettings)
    run: RunSettings = field(default_factory=RunSettings)
    mta_sts: MtaStsSettings = field(default_factory=MtaStsSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    web: WebSettings = field(default_factory=WebSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def accounts_db(self) -> Path:
        return self.data_dir / "accounts.sqlite3"

    @property
    def sieve_dir(self) -> Path:
        """Users' Sieve scripts (storage/sieve_scripts.py)."""
        return self.data_dir / "sieve"


def _system_hostname(default: Settings) -> str:
    """The machine's FQDN when the file names none; the default if it is not usable."""
    try:
        name = normalise_domain(socket.getfqdn())
    except AddressError:
        return default.hostname
    return default.hostname if name.startswith("[") else name


def find_config(explicit: str | None) -> Path | None:
    """The config file to use: -c, then $POSTOFFICE_CONFIG, then
    ./postoffice.toml, then /etc/postoffice/postoffice.toml; None: built-in."""
    return _search(explicit)[0]


def config_origin(explicit: str | None) -> str:
    """How ``find_config`` chose, in words (for messages about the wrong config)."""
    return _search(explicit)[1]


def _search(explicit: str | None) -> tuple[Path | None, str]:
    if explicit:
        return Path(explicit), "given with -c"
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), f"from ${CONFIG_ENV}"
    local = Path(DEFAULT_CONFIG_NAME)
    if local.is_file():
        return local, f"./{DEFAULT_CONFIG_NAME} in {Path.cwd()}"
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, "the system config"
    return None, (
        f"no -c, no ${CONFIG_ENV}, no ./{DEFAULT_CONFIG_NAME} in {Path.cwd()}, no {SYSTEM_CONFIG}"
    )


def trusted_config_owners(environ: Mapping[str, str] = os.environ) -> frozenset[int] | None:
    """Who may own the config file we read: None (anyone) unless we run as
    root; then root, and the user who ran sudo (it could become root anyway)."""
    if os.geteuid() != 0:
        return None
    owners = {0}
    sudo_uid = environ.get("SUDO_UID", "")
    if sudo_uid.isdigit():
        owners.add(int(sudo_uid))
    return frozenset(owners)


def _untrusted(st: os.stat_result, owners: frozenset[int]) -> str:
    """Why root must not act on a config file with this owner and mode ("" if fine).

    Root runs every command as that file says: its data_dir decides where root
    writes, its [log] file what ``serve`` appends to.  A ./postoffice.toml
    that another user left in /tmp, or a file such a user may edit, would make
    root act for them."""
    if st.st_uid not in owners:
        try:
            who = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            who = f"uid {st.st_uid}"
        return (
            f"owned by {who}, not root: run as root, postoffice reads only a config file"
            f" root owns (or the sudo user's); chown it to root, or run the command as {who}"
        )
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0):
        return (
            "writable by other users: run as root, postoffice reads only a config file"
            " nobody else can change; chmod go-w it"
        )
    return ""


def load_settings(path: Path | None, *, trusted_owners: frozenset[int] | None = None) -> Settings:
    """Load and validate ``path`` (None: the embedded default); raise ConfigError.

    ``trusted_owners`` (see ``trusted_config_owners``): refuse a file owned by
    anyone else, or writable by others."""
    if path is None:
        # ./postoffice-data of the directory we run in, named in full in messages.
        return Settings(data_dir=Settings().data_dir.absolute())
    source = str(path)
    try:
        with open(path, "rb") as fh:
            if trusted_owners is not None:  # the file we read, not one swapped in after
                why = _untrusted(os.fstat(fh.fileno()), trusted_owners)
                if why:
                    raise ConfigError(source, "", why)
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets this through
        raise ConfigError(source, "", f"not valid TOML: not UTF-8 at byte {exc.start}") from None
    # Relative paths in the file mean "next to the file", wherever we run from.
    return _Loader(source, path.absolute().parent).settings(raw)


# Numbers for which 0 would silently break the server (every session timing
# out at once, no recipient ever accepted) rather than turn a feature off.
_MUST_BE_POSITIVE = frozenset(
    {
        "max_recipients",
        "max_connections",
        "max_connections_per_ip",
        "smtp_timeout",
        "smtp_data_timeout",
        "pop3_timeout",
        "imap_timeout",
        "max_errors",
        "throttle_window",
        "give_up_after",
        "max_per_destination",
        "max_deliveries",
        "connect_timeout",
        "hook_timeout",
        "command_timeout",
        "eom_timeout",
    }
)


# What users wrote, in TOML's words rather than Python's.
_KIND_NAMES: dict[type, str] = {
    bool: "a boolean (true or false)",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a table",
}


def _toml_kind(value: Any) -> str:
    kind = _KIND_NAMES.get(type(value), f"a {type(value).__name__}")
    return kind.split(" (")[0]


class _Loader:
    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.source, key, reason)

    def table(self, raw: Any, key: str, allowed: type) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(key, "must be a table")
        names = {f.name for f in fields(allowed)} - {"source"}
        for name in raw:
            if name not in names:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown key (known: {', '.join(sorted(names))})")
        return raw

    def settings(self, raw: dict[str, Any]) -> Settings:
        top = self.table(raw, "", Settings)
        default = Settings()
        hostname = (
            self.hostname(top["hostname"]) if "hostname" in top else _system_hostname(default)
        )
        data_dir = self.path(top.get("data_dir", str(default.data_dir)), "data_dir")
        listed = self.typed(top.get("domains", list(default.domains)), list, "domains")
        # Order kept (the first is the primary domain), duplicates dropped.
        domains = tuple(
            dict.fromkeys(self.domain(d, f"domains[{i}]") for i, d in enumerate(listed))
        )
        return Settings(
            hostname=hostname,
            data_dir=data_dir,
            domains=domains,
            source=self.source,
            listen=self.listen(top.get("listen", {})),
            tls=self.tls(top.get("tls", {})),
            acme=self.acme(top.get("acme", {})),
            limits=self.limits(top.get("limits", {})),
            auth=self.numbers(top.get("auth", {}), "auth", AuthSettings),
            relay=self.relay(top.get("relay", {})),
            checks=self.checks(top.get("checks", {})),
            log=self.log(top.get("log", {})),
            run=self.run(top.get("run", {})),
            mta_sts=self.mta_sts(top.get("mta_sts", {})),
            filters=self.filters(top.get("filters", {})),
            web=self.web(top.get("web", {})),
            cluster=self.cluster(top.get("cluster", {})),
        )

    def typed(self, value: Any, kind: type, key: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {_KIND_NAMES[kind]}, not {_toml_kind(value)}")
        return value

    def hostname(self, value: Any) -> str:
        value = self.typed(value, str, "hostname")
        try:
            name = normalise_domain(value)
        except AddressError as exc:
            raise self.fail("hostname", str(exc)) from None
        if name.startswith("["):
            raise self.fail("hostname", "must be a host name")
        return name

    def domain(self, value: Any, key: str) -> str:
        try:
            name = normalise_domain(self.typed(value, str, key))
        except AddressError as exc:
            raise self.fail(key, str(exc)) from None
        if name.startswith("["):
            raise self.fail(key, "must be a domain name")
        return name

    def path(self, value: Any, key: str) -> Path:
        text = self.typed(value, str, key)
        if not text:
            raise self.fail(key, "must not be empty")
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path

    def address(self, value: Any, key: str) -> ListenAddress:
        text = self.typed(value, str, key)
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise self.fail(key, f"{text!r} is not host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text)
        except ValueError:
            raise self.fail(key, f"port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise self.fail(key, f"port {port} is out of range 0-65535")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                normalise_domain(host)
            except AddressError:
                raise self.fail(key, f"{host!r} is not an IP address or host name") from None
        return ListenAddress(host, port)

    def addresses(self, value: Any, key: str) -> tuple[ListenAddress, ...]:
        items = self.typed(value, list, key)
        return tuple(self.address(v, f"{key}[{i}]") for i, v in enumerate(items))

    def destination(self, value: Any, key: str) -> ListenAddress:
        """A host:port we connect to: unlike a listener, port 0 means nothing."""
        address = self.address(value, key)
        if address.port == 0:
            raise self.fail(key, "port 0 cannot be connected to")
        return address

    def destinations(self, value: Any, key: str) -> tuple[ListenAddress, ...]:
        items = self.typed(value, list, key)
        return tuple(self.destination(v, f"{key}[{i}]") for i, v in enumerate(items))

    def listen(self, raw: Any) -> ListenSettings:
        table = self.table(raw, "listen", ListenSettings)
        default = ListenSettings()
        values = {
            f.name: self.addresses(table[f.name], f"listen.{f.name}")
            if f.name in table
            else getattr(default, f.name)
            for f in fields(ListenSettings)
        }
        return ListenSettings(**values)

    def tls(self, raw: Any) -> TlsSettings:
        table = self.table(raw, "tls", TlsSettings)
        # An empty string counts as unset; anything else must be a usable path.
        cert_text = self.typed(table.get("cert", ""), str, "tls.cert")
        key_text = self.typed(table.get("key", ""), str, "tls.key")
        cert = self.path(cert_text, "tls.cert") if cert_text else None
        key = self.path(key_text, "tls.key") if key_text else None
        if (cert is None) != (key is None):
            raise self.fail("tls", "set both cert and key, or neither")
        for name, p in (("tls.cert", cert), ("tls.key", key)):
            if p is not None and not p.is_file():
                raise self.fail(name, f"file not found: {p}")
        return TlsSettings(cert=cert, key=key)

    def acme(self, raw: Any) -> AcmeSettings:
        table = self.table(raw, "acme", AcmeSettings)
        directory = self.typed(table.get("directory", ""), str, "acme.directory")
        if not directory:
            if table:
                raise self.fail("acme.directory", "must be set (the CA's directory URL)")
            return AcmeSettings()
        if not directory.startswith("https://"):
            raise self.fail("acme.directory", "must be an https:// URL")
        listed = self.typed(table.get("names", []), list, "acme.names")
        names = tuple(
            dict.fromkeys(self.domain(n, f"acme.names[{i}]") for i, n in enumerate(listed))
        )
        bundle_text = self.typed(table.get("ca_bundle", ""), str, "acme.ca_bundle")
        bundle = self.path(bundle_text, "acme.ca_bundle") if bundle_text else None
        if bundle is not None and not bundle.is_file():
            raise self.fail("acme.ca_bundle", f"file not found: {bundle}")
        return AcmeSettings(
            directory=directory,
            email=self.typed(table.get("email", ""), str, "acme.email"),
            names=names,
            ca_bundle=bundle,
        )

    def numbers(self, raw: Any, key: str, kind: type[T]) -> T:
        table = self.table(raw, key, kind)
        default = kind()
        values: dict[str, Any] = {}
        for f in fields(kind):  # type: ignore[arg-type]
            if f.name not in table:
                continue
            expected = type(getattr(default, f.name))
            value = self.typed(table[f.name], expected, f"{key}.{f.name}")
            if expected in (int, float) and value < 0:
                raise self.fail(f"{key}.{f.name}", "must not be negative")
            if value == 0 and f.name in _MUST_BE_POSITIVE:
                raise self.fail(f"{key}.{f.name}", "must be greater than 0")
            values[f.name] = value
        return kind(**values)

    def limits(self, raw: Any) -> LimitSettings:
        limits = self.numbers(raw, "limits", LimitSettings)
        if limits.max_line_length < 998:
            # Shorter would refuse mail that RFC 5322 §2.1.1 allows.
            raise self.fail("limits.max_line_length", "must be at least 998")
        if not math.isfinite(limits.error_delay):
            raise self.fail("limits.error_delay", "must be a finite number")
        return limits

    def relay(self, raw: Any) -> RelaySettings:
        table = self.table(raw, "relay", RelaySettings)
        simple = {
            k: v
            for k, v in table.items()
            if k not in ("dns_servers", "smarthost", "retry_schedule")
        }
        base = self.numbers(simple, "relay", RelaySettings)
        smarthost_text = self.typed(table.get("smarthost", ""), str, "relay.smarthost")
        schedule = base.retry_schedule
        if "retry_schedule" in table:
            items = self.typed(table["retry_schedule"], list, "relay.retry_schedule")
            schedule = tuple(
                self.typed(v, float, f"relay.retry_schedule[{i}]") for i, v in enumerate(items)
            )
            if not schedule or any(s <= 0 for s in schedule):
                raise self.fail("relay.retry_schedule", "needs one or more positive delays")
        if not 0 < base.mx_port <= 65535:
            raise self.fail("relay.mx_port", f"port {base.mx_port} is out of range 1-65535")
        if not 0 < base.mta_sts_port <= 65535:
            raise self.fail("relay.mta_sts_port", f"port {base.mta_sts_port} is out of range")
        if base.tls not in ("opportunistic", "verify", "dane-only"):
            raise self.fail("relay.tls", f"{base.tls!r} is not opportunistic, verify or dane-only")
        if base.ca_file and not Path(base.ca_file).is_file():
            raise self.fail("relay.ca_file", f"{base.ca_file} is not a readable file")
        return RelaySettings(
            **{
                f.name: getattr(base, f.name)
                for f in fields(RelaySettings)
                if f.name not in ("dns_servers", "smarthost", "retry_schedule")
            },
            dns_servers=self.destinations(table.get("dns_servers", []), "relay.dns_servers"),
            smarthost=self.destination(smarthost_text, "relay.smarthost")
            if smarthost_text
            else None,
            retry_schedule=schedule,
        )

    def checks(self, raw: Any) -> CheckSettings:
        table = self.table(raw, "checks", CheckSettings)
        simple = {k: v for k, v in table.items() if k != "exempt_networks"}
        base = self.numbers(simple, "checks", CheckSettings)
        if "exempt_networks" not in table:
            return base
        networks = self.networks(table["exempt_networks"], "checks.exempt_networks")
        return CheckSettings(exempt_networks=networks, dmarc_reject=base.dmarc_reject)

    def networks(
        self, raw: Any, key: str
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        items = self.typed(raw, list, key)
        networks = []
        for i, v in enumerate(items):
            where = f"{key}[{i}]"
            try:
                networks.append(ipaddress.ip_network(self.typed(v, str, where), strict=False))
            except ValueError as exc:
                raise self.fail(where, str(exc)) from None
        return tuple(networks)

    def web(self, raw: Any) -> WebSettings:
        table = self.table(raw, "web", WebSettings)
        if "admin_networks" not in table:
            return WebSettings()
        return WebSettings(
            admin_networks=self.networks(table["admin_networks"], "web.admin_networks")
        )

    def run(self, raw: Any) -> RunSettings:
        run = self.numbers(raw, "run", RunSettings)
        if not run.user:
            raise self.fail("run.user", "must not be empty")
        return run

    def mta_sts(self, raw: Any) -> MtaStsSettings:
        table = self.table(raw, "mta_sts", MtaStsSettings)
        mode = self.typed(table.get("mode", MtaStsSettings().mode), str, "mta_sts.mode")
        if mode not in MTA_STS_MODES:
            raise self.fail("mta_sts.mode", f"must be one of: {', '.join(MTA_STS_MODES)}")
        numbers = self.numbers(
            {k: v for k, v in table.items() if k != "mode"}, "mta_sts", MtaStsSettings
        )
        if numbers.max_age > MTA_STS_MAX_AGE:
            raise self.fail("mta_sts.max_age", f"must be at most {MTA_STS_MAX_AGE} (RFC 8461 3.2)")
        return MtaStsSettings(mode=mode, max_age=numbers.max_age)

    def log(self, raw: Any) -> LogSettings:
        table = self.table(raw, "log", LogSettings)
        default = LogSettings()
        fmt = self.typed(table.get("format", default.format), str, "log.format")
        if fmt not in LOG_FORMATS:
            raise self.fail("log.format", f"must be one of: {', '.join(LOG_FORMATS)}")
        level = self.typed(table.get("level", default.level), str, "log.level").lower()
        if level not in LOG_LEVELS:
            raise self.fail("log.level", f"must be one of: {', '.join(LOG_LEVELS)}")
        file_text = self.typed(table.get("file", ""), str, "log.file")
        syslog = self.typed(table.get("syslog", ""), str, "log.syslog")
        return LogSettings(
            format=fmt,
            level=level,
            file=self.path(file_text, "log.file") if file_text else None,
            syslog=syslog,
        )

    def filters(self, raw: Any) -> FilterSettings:
        table = self.table(raw, "filters", FilterSettings)
        simple = {k: v for k, v in table.items() if k not in ("milters", "hooks")}
        base = self.numbers(simple, "filters", FilterSettings)
        if base.default_action not in FILTER_ACTIONS:
            raise self.fail(
                "filters.default_action", f"must be one of: {', '.join(FILTER_ACTIONS)}"
            )
        if not math.isfinite(base.hook_timeout):
            raise self.fail("filters.hook_timeout", "must be a finite number")
        url = base.rspamd_controller
        if url and not url.startswith(("http://", "https://")):
            raise self.fail("filters.rspamd_controller", "must be an http:// or https:// URL")
        hooks = []
        for i, v in enumerate(self.typed(table.get("hooks", []), list, "filters.hooks")):
            key = f"filters.hooks[{i}]"
            text = self.typed(v, str, key)
            module, _, attr = text.partition(":")
            if not module or not attr or not all(p.isidentifier() for p in module.split(".")):
                raise self.fail(key, f'{text!r} is not "package.module:Class"')
            hooks.append(text)
        milters = []
        listed = self.typed(table.get("milters", []), list, "filters.milters")
        for i, v in enumerate(listed):
            milters.append(self.milter(v, f"filters.milters[{i}]", base.default_action))
        return FilterSettings(
            milters=tuple(milters),
            hooks=tuple(hooks),
            default_action=base.default_action,
            hook_timeout=base.hook_timeout,
            junk_folder=base.junk_folder,
            rspamd_controller=url,
        )

    def cluster(self, raw: Any) -> ClusterSettings:
        cluster = self.numbers(raw, "cluster", ClusterSettings)
        url = cluster.database.strip()
        if url and not url.startswith(CLUSTER_SCHEMES):
            raise self.fail("cluster.database", 'must be a "postgresql://..." URL, or ""')
        if any(c.isspace() or not c.isprintable() for c in url):
            raise self.fail("cluster.database", "must not contain spaces or control characters")
        if not math.isfinite(cluster.queue_lease) or cluster.queue_lease < 1:
            raise self.fail("cluster.queue_lease", "must be a number of seconds, at least 1")
        return ClusterSettings(database=url, queue_lease=cluster.queue_lease)

    def milter(self, value: Any, key: str, default_action: str) -> MilterSettings:
        if isinstance(value, str):
            value = {"address": value}
        table = self.table(value, key, MilterSettings)
        if "address" not in table:
            raise self.fail(f"{key}.address", "is required")
        address = self.typed(table["address"], str, f"{key}.address")
        kind, _, rest = address.partition(":")
        if kind not in ("inet", "inet6", "unix") or not rest:
            raise self.fail(
                f"{key}.address", f'{address!r} is not "inet:HOST:PORT" or "unix:/path"'
            )
        if kind != "unix":
            host, _, port = rest.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise self.fail(f"{key}.address", f"{address!r} needs a HOST:PORT")
        action = self.typed(table.get("default_action", default_action), str, key)
        if action not in FILTER_ACTIONS:
            raise self.fail(f"{key}.default_action", f"must be one of: {', '.join(FILTER_ACTIONS)}")
        numbers = self.numbers(
            {k: v for k, v in table.items() if k.endswith("_timeout")},
            key,
            _MilterTimeouts,
        )
        for name in ("connect_timeout", "command_timeout", "eom_timeout"):
            if not math.isfinite(getattr(numbers, name)):
                raise self.fail(f"{key}.{name}", "must be a finite number")
        return MilterSettings(
            address=address,
            default_action=action,
            connect_timeout=numbers.connect_timeout,
            command_timeout=numbers.command_timeout,
            eom_timeout=numbers.eom_timeout,
        )


@dataclass(frozen=True, slots=True)
class _MilterTimeouts:
    # MilterSettings' numbers alone, so the generic number loader can check them.
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    eom_timeout: float = 60.0
