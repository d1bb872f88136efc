"""The embedded account store: local domains, users and aliases in one SQLite file.

The server asks this store about every RCPT and every login, so reads never
touch SQL: the whole store is kept as dicts (a snapshot) and reloaded only
when ``PRAGMA data_version`` says another connection (the CLI, run while
``serve`` is up) committed a change.  That pragma takes two lock calls and
a stat (a few per cent of a message's CPU), so it is skipped while the
database and WAL files look untouched (inode, size, mtime: a commit changes
at least one) and was asked less than ``RECHECK_SECONDS`` ago; the lookup
itself is a dict access.  Writes go through ``BEGIN IMMEDIATE`` so
their checks ("no such alias", "domain is local") and the insert are one
atomic step even when two CLI commands race.

The database is WAL-mode (readers never wait for the CLI's writer), has a
busy timeout (writers queue instead of failing), and records its schema
version in ``PRAGMA user_version``.  Its file is created mode 0600: it holds
password hashes.

Postmaster (RFC 5321 §4.5.1): every domain must accept mail for
``postmaster``.  The administrator creates it per domain, e.g.
``postoffice alias add postmaster@example.test admin@example.test``.
There is no fallback to another domain's postmaster: in a server shared by
several tenants that would hand one tenant the other's postmaster mail and,
through sender ownership, the right to send as it (policy/relay.py says
what happens to mail for a domain that has none).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postoffice.mail.address import (
    Address,
    AddressError,
    mailbox_local_part,
    normalise_domain,
    parse_mailbox,
    split_plus,
)
from postoffice.storage.accounts import (
    MAX_APP_LABEL,
    MAX_APP_PASSWORDS,
    AccountError,
    AppPassword,
    Resolution,
)

log = logging.getLogger("postoffice.accounts")

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 10_000
MAX_ALIAS_DEPTH = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY NOT NULL,      -- "local@domain", account form
    password_hash TEXT NOT NULL,
    quota INTEGER,                          -- bytes, 0 for none, NULL for [limits] mailbox_quota
    admin INTEGER NOT NULL DEFAULT 0        -- 1: may use the admin web pages (`user admin`)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS app_passwords (
    address TEXT NOT NULL,                  -- the user, "local@domain"
    id TEXT NOT NULL,                       -- random, names it for revoking
    label TEXT NOT NULL,                    -- what the user called it ("phone")
    digest TEXT NOT NULL,                   -- SHA-256 (hex) of the normalised password
    created REAL NOT NULL,                  -- time.time()
    PRIMARY KEY (address, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT NOT NULL,                    -- "local@domain", or "@domain" (catch-all)
    position INTEGER NOT NULL,              -- keeps the targets in the order given
    target TEXT NOT NULL,                   -- "local@domain", local or remote
    PRIMARY KEY (alias, position)
) WITHOUT ROWID;
"""

# Each step takes a database from version (index + 1) to (index + 2); a
# database at version 0 is new and gets _SCHEMA, which is the latest shape.
_MIGRATIONS = (
    # 1 -> 2: per-mailbox quotas (``postoffice user quota``).
    "ALTER TABLE users ADD COLUMN quota INTEGER",
    # 2 -> 3: the admin flag (``postoffice user admin``, the web pages).
    "ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",
    # 3 -> 4: app passwords (the web pages' /account).
    "CREATE TABLE app_passwords (address TEXT NOT NULL, id TEXT NOT NULL, label TEXT NOT NULL,"
    " digest TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (address, id)) WITHOUT ROWID",
)


@dataclass
class _Snapshot:
    """Everything in the database, as the server reads it."""

    domains: frozenset[str] = frozenset()
    users: dict[str, str] = field(default_factory=dict)  # "local@domain" -> hash
    quotas: dict[str, int] = field(default_factory=dict)  # users with their own quota
    aliases: dict[str, tuple[Address, ...]] = field(default_factory=dict)
    admins: frozenset[str] = frozenset()  # users flagged admin
    app_passwords: dict[str, tuple[AppPassword, ...]] = field(default_factory=dict)


@dataclass
class _Expansion:
    """Accumulates one resolve(): results in first-seen order, aliases visited."""

    mailboxes: dict[Address, None] = field(default_factory=dict)
    forwards: dict[Address, None] = field(default_factory=dict)
    visited: set[str] = field(default_factory=set)

    def result(self) -> Resolution:
        return Resolution(tuple(self.mailboxes), tuple(self.forwards))


def read_app_passwords(conn: Any) -> dict[str, tuple[AppPassword, ...]]:
    """Every user's app passwords (oldest first), from either store's connection."""
    found: dict[str, list[AppPassword]] = {}
    for address, password_id, label, digest, created in conn.execute(
        "SELECT address, id, label, digest, created FROM app_passwords ORDER BY created, id"
    ):
        found.setdefault(address, []).append(
            AppPassword(str(password_id), str(label), str(digest), float(created))
        )
    return {k: tuple(v) for k, v in found.items()}


def _key(local: str, domain: str) -> str:
    return f"{local}@{domain}"


def _split_stored(text: str) -> Address:
    # Stored targets are str(Address); the domain never contains "@", so the
    # last "@" separates them even when a remote local part is quoted.
    local, _sep, domain = text.rpartition("@")
    return Address(local, domain)


def _parse_alias(alias: str) -> tuple[str, str]:
    """``"local@domain"`` or ``"@domain"`` -> (stored key, domain); raise AccountError."""
    text = alias.strip()
    try:
        if text.startswith("@"):
            domain = normalise_domain(text[1:])
            if domain.startswith("["):
                raise AddressError("an alias needs a domain name, not an address literal")
            return _key("", domain), domain
        addr = parse_mailbox(text)
    except AddressError as exc:
        raise AccountError(f"{alias}: {exc}") from None
    return _key(addr.local, addr.domain), addr.domain


def _account(address: Address) -> Address:
    """``address`` in account form (as ``parse_mailbox`` gives); raise AccountError."""
    try:
        local = mailbox_local_part(address.local)
        domain = normalise_domain(address.domain)
    except AddressError as exc:
        raise AccountError(f"{address}: {exc}") from None
    if domain.startswith("["):
        raise AccountError(f"{address}: a mailbox needs a domain name, not an address literal")
    return Address(local, domain)


def _domain_name(name: str) -> str:
    try:
        domain = normalise_domain(name.strip())
    except AddressError as exc:
        raise AccountError(f"{name}: {exc}") from None
    if domain.startswith("["):
        raise AccountError(f"{name}: a local domain is a name, not an address literal")
    return domain


def _target(target: Address) -> Address:
    """An alias target with its domain normalised; raise AccountError."""
    try:
        domain = normalise_domain(target.domain)
    except AddressError as exc:
        raise AccountError(f"{target}: {exc}") from None
    if not target.local or domain.startswith("["):
        raise AccountError(f"{target}: alias targets are local@domain addresses")
    return Address(target.local, domain)


def _local_target(target: Address) -> Address:
    """A target in a local domain must name an account, optionally with a +tag."""
    try:
        mailbox_local_part(split_plus(target.local))
    except AddressError as exc:
        raise AccountError(f"{target}: {exc}") from None
    return Address(target.local.lower(), target.domain)


def _account_names(local: str) -> list[str]:
    """The account names ``local`` may mean, in lookup order: itself, then
    without its +tag.  Quoted, "%", "!", "/"...: none (never a relay path)."""
    names: list[str] = []
    for candidate in (local, split_plus(local)):
        try:
            name = mailbox_local_part(candidate)
        except AddressError:
            continue
        if name not in names:
            names.append(name)
    return names


RECHECK_SECONDS = 1.0  # PRAGMA data_version at least this often, whatever the files say


class SqliteAccountStore:
    """``AccountStore`` on SQLite, with an in-memory snapshot for the hot path."""

    def __init__(self, db_path: Path, config_domains: Sequence[str] = ()) -> None:
        self.path = db_path
        self._db_file = os.fspath(db_path)
        self._wal_file = self._db_file + "-wal"
        self._config_domains = tuple(d.lower() for d in config_domains)
        self._config_set = frozenset(self._config_domains)
        self._lock = threading.RLock()  # one connection; the CLI and tests may share it
        self._snapshot = _Snapshot()
        self._data_version: int | None = None
        self._stale = True
        self._files: tuple[int, ...] | None = None  # what _file_state said at the last check
        self._checked = 0.0  # time.monotonic() of the last data_version check
        try:
            self._conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            raise AccountError(f"cannot open accounts database {db_path}: {exc}") from None

    # --- opening and refreshing ---------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            # Created 0600 before SQLite sees it; SQLite gives the -wal and
            # -shm files the database file's permissions.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # isolation_level=None: no implicit transactions; writes say BEGIN IMMEDIATE.
        # timeout= is SQLite's busy timeout: a writer waits for another, not fails.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a confirmed CLI change survives power loss
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AccountError(
                f"accounts database {self.path} has schema version {version}; this postoffice"
                f" knows up to {SCHEMA_VERSION} (was it written by a newer release?)"
            )
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again inside the write lock: another process may have migrated.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            else:
                for statement in _MIGRATIONS[version - 1 :]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _current(self) -> _Snapshot:
        """The snapshot, reloaded first if any connection committed since it was taken."""
        with self._lock:
            # Taken before the pragma: a commit landing in between shows next time.
            files = self._file_state()
            now = time.monotonic()
            if (
                not self._stale
                and files is not None
                and files == self._files
                and now - self._checked < RECHECK_SECONDS
            ):
                return self._snapshot
            try:
                version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                if self._stale or version != self._data_version:
                    self._snapshot = self._load()
                    self._data_version = version
                    self._stale = False
                self._files, self._checked = files, now
            except sqlite3.Error as exc:
                # Keep serving from the last good snapshot rather than refuse mail.
                log.error("cannot read accounts database %s: %s", self.path, exc)
            return self._snapshot

    def _file_state(self) -> tuple[int, ...] | None:
        """Inode, size and mtime of the database and its WAL; None if unknown."""
        state: list[int] = []
        try:
            for path in (self._db_file, self._wal_file):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    state += (0, 0, 0)
                    continue
                state += (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None
        return tuple(state)

    def _load(self) -> _Snapshot:
        self._conn.execute("BEGIN")  # one consistent read of all three tables
        try:
            return self._read_all()
        finally:
            self._conn.execute("COMMIT")

    def _read_all(self) -> _Snapshot:
        conn = self._conn
        domains = frozenset(row[0] for row in conn.execute("SELECT name FROM domains"))
        users: dict[str, str] = {}
        quotas: dict[str, int] = {}
        for address, password_hash, quota in conn.execute(
            "SELECT address, password_hash, quota FROM users"
        ):
            users[address] = password_hash
            if quota is not None:
                quotas[address] = quota
        grouped: dict[str, list[Address]] = {}
        for alias, target in conn.execute(
            "SELECT alias, target FROM aliases ORDER BY alias, position"
        ):
            grouped.setdefault(alias, []).append(_split_stored(target))
        admins = frozenset(
            row[0] for row in conn.execute("SELECT address FROM users WHERE admin <> 0")
        )
        aliases = {k: tuple(v) for k, v in grouped.items()}
        return _Snapshot(domains, users, quotas, aliases, admins, read_app_passwords(conn))

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, _Snapshot]]:
        """A write transaction, with a snapshot read inside it for the checks."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise AccountError(f"accounts database {self.path}: {exc}") from None
            try:
                # Inside the write lock nobody else can commit: this view is current.
                snapshot = self._read_all()
                yield self._conn, snapshot
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise AccountError(f"accounts database {self.path}: {exc}") from None
            except BaseException:
                self._rollback()
                raise
            finally:
                # Our own commits do not change our data_version: reload next read.
                self._stale = True

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    # --- domains -------------------------------------------------------------------
    def set_config_domains(self, domains: Sequence[str]) -> None:
        """The config's domains after a reload; one assignment each, so a reader
        on another thread sees the old set or the new one."""
        self._config_domains = tuple(d.lower() for d in domains)
        self._config_set = frozenset(self._config_domains)

    def _is_local(self, snap: _Snapshot, domain: str) -> bool:
        return domain in self._config_set or domain in snap.domains

    def add_domain(self, name: str) -> None:
        domain = _domain_name(name)
        if domain in self._config_set:
            raise AccountError(f"{domain} is already a local domain (from the config file)")
        with self._write() as (conn, snap):
            if domain in snap.domains:
                raise AccountError(f"domain {domain} exists already")
            conn.execute("INSERT INTO domains (name) VALUES (?)", (domain,))

    def remove_domain(self, name: str) -> None:
        domain = _domain_name(name)
        with self._write() as (conn, snap):
            if domain not in snap.domains:
                if domain in self._config_set:
                    raise AccountError(f"{domain} comes from the config file; remove it there")
                raise AccountError(f"no such domain: {domain}")
            users = [u for u in snap.users if u.rpartition("@")[2] == domain]
            aliases = [a for a in snap.aliases if a.rpartition("@")[2] == domain]
            # Refuse to orphan accounts: their mail would silently start to relay
            # (or bounce) while the mailboxes stay on disk.
            if (users or aliases) and domain not in self._config_set:
                raise AccountError(
                    f"domain {domain} still has {len(users)} user(s) and {len(aliases)}"
                    " alias(es); remove them first"
                )
            conn.execute("DELETE FROM domains WHERE name = ?", (domain,))

    def list_domains(self) -> list[str]:
        return sorted(self._current().domains)

    def is_local_domain(self, domain: str) -> bool:
        return self._is_local(self._current(), domain.lower())

    # --- users -----------------------------------------------------------------------
    def add_user(self, address: Address, password_hash: str) -> None:
        account = _account(address)
        key = _key(account.local, account.domain)
        if not password_hash:
            raise AccountError("refusing an empty password hash")
        with self._write() as (conn, snap):
            if not self._is_local(snap, account.domain):
                raise AccountError(f"{account.domain} is not a local domain; add the domain first")
            if key in snap.users:
                raise AccountError(f"user {key} exists already")
            if key in snap.aliases:
                raise AccountError(f"{key} is an alias; remove the alias first")
            conn.execute(
                "INSERT INTO users (address, password_hash) VALUES (?, ?)", (key, password_hash)
            )

    def set_password(self, address: Address, password_hash: str) -> None:
        account = _account(address)
        key = _key(account.local, account.domain)
        if not password_hash:
            raise AccountError("refusing an empty password hash")
        with self._write() as (conn, snap):
            if key not in snap.users:
                raise AccountError(f"no such user: {key}")
            conn.execute(
                "UPDATE users SET password_hash = ? WHERE address = ?", (password_hash, key)
            )

    def remove_user(
        self, address: Address, *, from_aliases: bool = False
    ) -> dict[str, tuple[Address, ...]]:
        """Remove the user.  Aliases that deliver to it make this an error
        unless ``from_aliases``: then it is taken out of them too, and an alias
        left without targets goes.  Returns each changed alias and what it has
        left (nothing: removed)."""
        account = _account(address)
        key = _key(account.local, account.domain)
        with self._write() as (conn, snap):
            if key not in snap.users:
                raise AccountError(f"no such user: {key}")
            pointing = self._aliases_to(snap, key)
            if pointing and not from_aliases:
                names = ", ".join(pointing)
                raise AccountError(f"{key} is a target of the alias(es) {names}")
            changed: dict[str, tuple[Address, ...]] = {}
            for alias, targets in pointing.items():
                left = tuple(t for t in snap.aliases[alias] if t not in targets)
                conn.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
                conn.executemany(
                    "INSERT INTO aliases (alias, position, target) VALUES (?, ?, ?)",
                    [(alias, i, str(t)) for i, t in enumerate(left)],
                )
                changed[alias] = left
            conn.execute("DELETE FROM users WHERE address = ?", (key,))
            conn.execute("DELETE FROM app_passwords WHERE address = ?", (key,))
        return changed

    def aliases_to(self, address: Address) -> dict[str, tuple[Address, ...]]:
        """The aliases with a target that delivers straight to user ``address``
        (plus-addresses of it included), and those targets."""
        account = _account(address)
        return self._aliases_to(self._current(), _key(account.local, account.domain))

    def _aliases_to(self, snap: _Snapshot, key: str) -> dict[str, tuple[Address, ...]]:
        found: dict[str, tuple[Address, ...]] = {}
        for alias, targets in snap.aliases.items():
            hits = tuple(t for t in targets if self._names_key(snap, t) == key)
            if hits:
                found[alias] = hits
        return found

    def _names_key(self, snap: _Snapshot, target: Address, new: str = "") -> str | None:
        """The user or alias (``new``: one being added) a local alias target
        reaches first, in ``_lookup``'s order without the catch-all; None for
        remote or unknown targets."""
        domain = target.domain.lower()
        if not self._is_local(snap, domain):
            return None
        for name in _account_names(target.local):
            key = _key(name, domain)
            if key == new or key in snap.users or key in snap.aliases:
                return key
        return None

    def list_users(self) -> list[Address]:
        users = [_split_stored(key) for key in self._current().users]
        return sorted(users, key=lambda a: (a.domain, a.local))

    def password_hash(self, address: Address) -> str | None:
        try:
            local = mailbox_local_part(address.local)
        except AddressError:
            return None  # not an account name at all: "no such user"
        return self._current().users.get(_key(local, address.domain.lower()))

    def set_quota(self, address: Address, quota: int | None) -> None:
        """``quota`` bytes for this mailbox (0: none), or None: the default."""
        account = _account(address)
        key = _key(account.local, account.domain)
        if quota is not None and not 0 <= quota < 2**63:
            raise AccountError(f"a quota is 0 to {2**63 - 1} bytes, not {quota}")
        with self._write() as (conn, snap):
            if key not in snap.users:
                raise AccountError(f"no such user: {key}")
            conn.execute("UPDATE users SET quota = ? WHERE address = ?", (quota, key))

    def quota(self, address: Address) -> int | None:
        """Asked right after ``resolve`` or ``password_hash`` of the same
        session step (RCPT, a login), which just checked the snapshot is
        current: read it without another check, so a server without quotas
        pays a dict lookup, not two more stats per recipient."""
        try:
            local = mailbox_local_part(address.local)
        except AddressError:
            return None
        snap = self._snapshot if not self._stale else self._current()
        return snap.quotas.get(_key(local, address.domain.lower()))

    # --- the admin flag (web pages) ----------------------------------------------------
    def set_admin(self, address: Address, admin: bool) -> None:
        """Flag user ``address`` as an admin of the web pages, or clear the flag."""
        account = _account(address)
        key = _key(account.local, account.domain)
        with self._write() as (conn, snap):
            if key not in snap.users:
                raise AccountError(f"no such user: {key}")
            conn.execute("UPDATE users SET admin = ? WHERE address = ?", (int(admin), key))

    def is_admin(self, address: Address) -> bool:
        try:
            local = mailbox_local_part(address.local)
        except AddressError:
            return False
        return _key(local, address.domain.lower()) in self._current().admins

    # --- app passwords ------------------------------------------------------------------
    def add_app_password(self, address: Address, label: str, digest: str) -> str:
        account = _account(address)
        key = _key(account.local, account.domain)
        label = label.strip()
        if not label or len(label) > MAX_APP_LABEL or not label.isprintable():
            raise AccountError(f"an app password needs a name of 1 to {MAX_APP_LABEL} characters")
        password_id = secrets.token_hex(8)
        with self._write() as (conn, snap):
            if key not in snap.users:
                raise AccountError(f"no such user: {key}")
            if len(snap.app_passwords.get(key, ())) >= MAX_APP_PASSWORDS:
                raise AccountError(f"at most {MAX_APP_PASSWORDS} app passwords per user")
            conn.execute(
                "INSERT INTO app_passwords (address, id, label, digest, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (key, password_id, label, digest, time.time()),
            )
        return password_id

    def remove_app_password(self, address: Address, password_id: str) -> None:
        account = _account(address)
        key = _key(account.local, account.domain)
        with self._write() as (conn, snap):
            if not any(p.id == password_id for p in snap.app_passwords.get(key, ())):
                raise AccountError("no such app password")
            conn.execute(
                "DELETE FROM app_passwords WHERE address = ? AND id = ?", (key, password_id)
            )

    def app_passwords(self, address: Address) -> list[AppPassword]:
        try:
            local = mailbox_local_part(address.local)
        except AddressError:
            return []
        return list(self._current().app_passwords.get(_key(local, address.domain.lower()), ()))

    # --- aliases ---------------------------------------------------------------------
    def add_alias(self, alias: str, targets: Sequence[Address]) -> None:
        key, domain = _parse_alias(alias)
        if not targets:
            raise AccountError(f"alias {key} needs at least one target")
        checked = [_target(t) for t in targets]
        with self._write() as (conn, snap):
            if not self._is_local(snap, domain):
                raise AccountError(f"{domain} is not a local domain; add the domain first")
            if key in snap.users:
                raise AccountError(f"{key} is a user; an alias must not shadow it")
            if key in snap.aliases:
                raise AccountError(f"alias {key} exists already; remove it first")
            stored: list[str] = []
            for target in checked:
                if self._is_local(snap, target.domain):
                    target = _local_target(target)
                text = str(target)
                if text == key:
                    raise AccountError(f"alias {key} must not point at itself")
                if text not in stored:
                    stored.append(text)
            loop = self._loop_through(snap, key, [_split_stored(t) for t in stored])
            if loop:
                raise AccountError(
                    f"alias {key} would make a loop: {' -> '.join([key, *loop])}; mail to"
                    " it would go round and round"
                )
            conn.executemany(
                "INSERT INTO aliases (alias, position, target) VALUES (?, ?, ?)",
                [(key, i, text) for i, text in enumerate(stored)],
            )

    def remove_alias(self, alias: str) -> None:
        key, _domain = _parse_alias(alias)
        with self._write() as (conn, snap):
            if key not in snap.aliases:
                raise AccountError(f"no such alias: {key}")
            conn.execute("DELETE FROM aliases WHERE alias = ?", (key,))

    def _loop_through(self, snap: _Snapshot, key: str, targets: list[Address]) -> list[str]:
        """The path back to ``key`` through aliases if ``key`` got ``targets``; []."""
        seen: set[str] = set()

        def walk(targets: Sequence[Address], path: list[str]) -> list[str]:
            for target in targets:
                reached = self._names_key(snap, target, new=key)
                if reached == key:
                    return [*path, key]
                if reached is None or reached in seen or reached not in snap.aliases:
                    continue
                seen.add(reached)
                found = walk(snap.aliases[reached], [*path, reached])
                if found:
                    return found
            return []

        return walk(targets, [])

    def list_aliases(self) -> dict[str, tuple[Address, ...]]:
        return dict(sorted(self._current().aliases.items()))

    # --- resolution ------------------------------------------------------------------
    def resolve(self, address: Address) -> Resolution | None:
        snap = self._current()
        domain = address.domain.lower()
        if not domain or not self._is_local(snap, domain):
            return None  # the bare <postmaster> is the session's to map (relay.py)
        found = _Expansion()
        self._lookup(snap, address.local, domain, found, depth=0, catch_all=True)
        return found.result()

    def _lookup(
        self,
        snap: _Snapshot,
        local: str,
        domain: str,
        found: _Expansion,
        depth: int,
        catch_all: bool,
    ) -> bool:
        """Exact user, exact alias, then plus-addressing (user, alias), then
        ``@domain``; False when none of them exists."""
        names = _account_names(local)
        for name in names:
            key = _key(name, domain)
            if key in snap.users:
                found.mailboxes[Address(name, domain)] = None
                return True
            if key in snap.aliases:
                self._expand(snap, key, found, depth)
                return True
        catch = _key("", domain)
        if catch_all and names and catch in snap.aliases:
            self._expand(snap, catch, found, depth)
            return True
        return False

    def _expand(self, snap: _Snapshot, key: str, found: _Expansion, depth: int) -> None:
        if key in found.visited:
            return  # a loop, or an alias reached twice: its targets are in already
        if depth >= MAX_ALIAS_DEPTH:
            log.warning("alias %s: nested more than %d deep; dropped", key, MAX_ALIAS_DEPTH)
            return
        found.visited.add(key)
        for target in snap.aliases.get(key, ()):
            domain = target.domain.lower()
            if self._is_local(snap, domain):
                # Unknown local targets add nothing (dropped); no catch-all for
                # targets, so a typo in an alias cannot be swallowed silently.
                if not self._lookup(snap, target.local, domain, found, depth + 1, False):
                    log.warning(
                        "alias %s: member %s is no user or alias (removed?); its copy is dropped",
                        key,
                        target,
                    )
            else:
                found.forwards[target] = None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
