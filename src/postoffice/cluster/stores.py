"""Which account store a config picks: PostgreSQL with [cluster] database, else
the embedded SQLite file.  The one place app.py, the CLI and ``check`` ask,
so they can never disagree about where the accounts are."""

from __future__ import annotations

from postoffice.config.settings import Settings
from postoffice.storage.accounts import AccountStore
from postoffice.storage.sqlite_accounts import SqliteAccountStore


def open_accounts(settings: Settings, *, follow: bool) -> AccountStore:
    """The account store; AccountError if it cannot be opened.  ``follow``:
    a long-running server keeping an in-memory copy current (PostgreSQL's
    listener thread), rather than a command asking once."""
    if settings.cluster.enabled:
        # Imported here: the embedded default never loads the driver.
        from postoffice.cluster.accounts import PostgresAccountStore

        return PostgresAccountStore(
            settings.cluster.database, config_domains=settings.domains, follow=follow
        )
    return SqliteAccountStore(settings.accounts_db, config_domains=settings.domains)
