"""``postoffice check``: will this config start, and is the data dir usable?

The config itself was already loaded (a ConfigError never gets here).  The
check changes nothing on disk: it does not create the data dir, generate a
certificate or create the accounts database, it only says whether starting
the server would be able to.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections import Counter
from pathlib import Path

from postoffice.config.settings import Settings
from postoffice.mail.address import Address
from postoffice.net.tls import CERT_NAME, KEY_NAME, server_context
from postoffice.storage.accounts import AccountError
from postoffice.storage.sqlite_accounts import SqliteAccountStore

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
    return []


def _check_tls(settings: Settings) -> tuple[list[str], list[str]]:
    """(problems, notes) about the certificate the server would use."""
    if settings.tls.cert and settings.tls.key:
        cert, key = settings.tls.cert, settings.tls.key
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
    db = settings.accounts_db
    if not db.exists():
        notes = [f"accounts database {db} is created on first use"]
        if not settings.domains:
            notes.append(_NO_DOMAINS)
        return [], notes
    try:
        store = SqliteAccountStore(db, config_domains=settings.domains)
    except AccountError as exc:
        return [str(exc)], []
    try:
        domains = sorted(set(settings.domains) | set(store.list_domains()))
        users = store.list_users()
        notes = [f"accounts database {db}: {len(users)} user(s), {len(domains)} local domain(s)"]
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


def _check_listeners(settings: Settings) -> list[str]:
    listen = settings.listen
    bound = Counter(
        (a.host, a.port)
        for group in (listen.smtp, listen.submission, listen.submissions, listen.pop3, listen.pop3s)
        for a in group
        if a.port != 0
    )
    return [
        f"{host}:{port} is used by more than one listener"
        for (host, port), n in bound.items()
        if n > 1
    ]


def problems_and_notes(settings: Settings) -> tuple[list[str], list[str]]:
    problems = _check_data_dir(settings.data_dir) + _check_listeners(settings)
    notes: list[str] = []
    for more_problems, more_notes in (_check_tls(settings), _check_accounts(settings)):
        problems += more_problems
        notes += more_notes
    return problems, notes


def run_check(settings: Settings) -> int:
    """Print the result; 0 when the server can start, 1 with each problem otherwise."""
    problems, notes = problems_and_notes(settings)
    print(f"config: {settings.source}")
    for note in notes:
        print(f"  {note}")
    for problem in problems:
        print(f"postoffice: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("ok")
    return 0
