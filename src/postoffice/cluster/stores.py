"""Which stores a config picks: PostgreSQL with [cluster] database, else the
embedded SQLite file (accounts) and data_dir/dkim/ (DKIM keys).  The one
place app.py, the CLI, ``check`` and ``doctor`` ask, so they can never
disagree about where the accounts and keys are."""

from __future__ import annotations

from postoffice.config.settings import Settings
from postoffice.policy.dkim_keys import DkimKey, SigningKeys
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


def open_signing_keys(settings: Settings, *, follow: bool) -> SigningKeys:
    """The DKIM keys the signer uses; DkimKeyError if they cannot be read.
    ``follow`` as for ``open_accounts``."""
    if settings.cluster.enabled:
        from postoffice.cluster.dkim_keys import ClusterKeyStore

        return ClusterKeyStore(settings.cluster.database, follow=follow)
    from postoffice.policy.dkim_keys import KeyStore

    return KeyStore(settings.data_dir)


def generate_dkim_keys(settings: Settings, domain: str, *, rotate: bool) -> list[DkimKey]:
    """``dkim generate``: new keys for ``domain`` where this config keeps them."""
    if settings.cluster.enabled:
        from postoffice.cluster import dkim_keys

        return dkim_keys.generate(settings.cluster.database, domain, rotate=rotate)
    from postoffice.policy.dkim_keys import generate

    return generate(settings.data_dir, domain, rotate=rotate)


def load_dkim_keys(settings: Settings, domain: str) -> list[DkimKey]:
    """The active DKIM keys of ``domain`` where this config keeps them."""
    if settings.cluster.enabled:
        from postoffice.cluster import dkim_keys

        return dkim_keys.load_keys(settings.cluster.database, domain)
    from postoffice.policy.dkim_keys import load_keys

    return load_keys(settings.data_dir, domain)
