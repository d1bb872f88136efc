"""The account store interface: local domains, users (mailboxes) and aliases.

The server only ever talks to ``AccountStore``; ``SqliteAccountStore``
(``storage/sqlite_accounts.py``) is the embedded implementation.  A server
database can be added later behind the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from postoffice.mail.address import Address


class AccountError(Exception):
    """A refused account change (exists already, unknown domain, ...); safe to print."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """Where mail for one address goes.

    ``mailboxes`` are local accounts (their Maildirs receive the message);
    ``forwards`` are remote addresses reached through the outbound queue.
    Both empty means: a local domain, but no such user (550 5.1.1).
    """

    mailboxes: tuple[Address, ...] = ()
    forwards: tuple[Address, ...] = ()

    @property
    def exists(self) -> bool:
        return bool(self.mailboxes or self.forwards)


@dataclass(frozen=True, slots=True)
class AppPassword:
    """A password for one mail client, made by the server and shown once;
    kept only as the SHA-256 (hex) of its normalised form (web/app_passwords.py)."""

    id: str
    label: str
    digest: str
    created: float  # time.time()


MAX_APP_PASSWORDS = 20  # per user
MAX_APP_LABEL = 64  # characters


class AccountStore(Protocol):
    """Domains, users and aliases.  Every method is cheap and safe to call often:
    changes made by another process (the CLI) are seen on the next call."""

    # Domains. ``config_domains`` from the TOML are local too, but not stored.
    def add_domain(self, name: str) -> None: ...
    def remove_domain(self, name: str) -> None: ...
    def list_domains(self) -> list[str]: ...
    def is_local_domain(self, domain: str) -> bool: ...

    # The config file's domains, again after a reload (reload.py).
    def set_config_domains(self, domains: Sequence[str]) -> None: ...

    # Users: ``address`` comes from ``parse_mailbox`` (account-safe local part).
    def add_user(self, address: Address, password_hash: str) -> None: ...
    def set_password(self, address: Address, password_hash: str) -> None: ...
    def remove_user(
        self, address: Address, *, from_aliases: bool = False
    ) -> dict[str, tuple[Address, ...]]:
        """Refused while aliases deliver to the user, unless ``from_aliases``:
        then it leaves them too (an alias left empty goes).  Returns each
        changed alias with its remaining targets."""
        ...

    def aliases_to(self, address: Address) -> dict[str, tuple[Address, ...]]:
        """Aliases with targets that deliver straight to user ``address``."""
        ...

    def list_users(self) -> list[Address]: ...
    def password_hash(self, address: Address) -> str | None: ...
    # A mailbox's own quota in bytes (0: none); None: ``[limits] mailbox_quota``.
    def set_quota(self, address: Address, quota: int | None) -> None: ...
    def quota(self, address: Address) -> int | None: ...

    # The admin flag (``postoffice user admin``): who may use the admin web
    # pages (web/).  A user removed and added again starts without it.
    def set_admin(self, address: Address, admin: bool) -> None: ...
    def is_admin(self, address: Address) -> bool: ...

    # App passwords: any of a user's logs it in to the mail protocols; each
    # is revoked on its own, and all go with the user.
    def add_app_password(self, address: Address, label: str, digest: str) -> str:
        """Returns the new password's id; AccountError past MAX_APP_PASSWORDS."""
        ...

    def remove_app_password(self, address: Address, password_id: str) -> None: ...
    def app_passwords(self, address: Address) -> list[AppPassword]: ...

    # Aliases: ``alias`` is "local@domain" (account-safe local part) or
    # "@domain" (catch-all).  Targets may be local or remote addresses; an
    # alias that would reach itself again (a -> b -> a) is refused.
    def add_alias(self, alias: str, targets: Sequence[Address]) -> None: ...
    def remove_alias(self, alias: str) -> None: ...
    def list_aliases(self) -> dict[str, tuple[Address, ...]]: ...

    def resolve(self, address: Address) -> Resolution | None:
        """None when the domain is not local; otherwise where the mail goes.

        Order: exact user, exact alias, plus-addressing (``alice+tag`` ->
        ``alice``, user then alias), then the domain's catch-all.  Alias
        targets are expanded recursively (bounded depth, loops cut).
        """
        ...

    def close(self) -> None: ...
