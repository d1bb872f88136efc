"""SIGHUP and ``postoffice reload``: a new config and certificate, no restart.

``load`` reads the config file again and builds the TLS context from it;
whatever fails there (a TOML error, an unknown key, a certificate that does
not load or does not match its key) is a ``ReloadError`` with the reason, and
the running config stays.  ``postoffice reload`` calls ``load`` itself before
it signals the server, so the admin sees the reason at once; the server
calls it again (the file may have changed between), and logs the reason.

What changes live (``apply``): limits, local domains, relay settings
(retries, smarthost, MX port, timeouts), the TLS certificate (new sessions
get it; sessions already up keep theirs), connection caps; the composition
root rebinds listeners whose addresses changed (app.py).  What a process
built once at start (``RESTART_ONLY``) keeps its old value, and the log says
which changed keys wait for a restart.
"""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postoffice.config.settings import (
    ConfigError,
    Settings,
    load_settings,
    trusted_config_owners,
)
from postoffice.delivery.outbound import Outbound
from postoffice.net.tls import CERT_NAME, KEY_NAME, cert_and_key, server_context
from postoffice.services import Services

# Keys a running process cannot change: where its data lives, its log
# handlers, its process count, its resolver and delivery slots, its password
# threads and throttle, its inbound checks, its filters, and the hostname its
# stores and certificate were made for.
RESTART_ONLY: tuple[str, ...] = (
    "hostname",
    "data_dir",
    "log",
    "checks",
    "run",
    "limits.smtp_processes",
    "relay.dns_servers",
    "relay.max_deliveries",
    "relay.max_per_destination",
    "filters",  # hooks are imported and milters connected once, at start
    "cluster",  # the account store and the queue (its lease) are opened once, at start
    # [auth] but allow_plaintext_loopback, which each session reads as it logs in.
    *(
        f"auth.{f.name}"
        for f in dataclasses.fields(Settings().auth)
        if f.name != "allow_plaintext_loopback"
    ),
)


class ReloadError(Exception):
    """The new config cannot be used; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Loaded:
    settings: Settings
    tls: ssl.SSLContext | None  # None: only checked, and no certificate made yet


def load(source: str, *, check_only: bool = False) -> Loaded:
    """Read the config ``source`` names again and load its certificate.  Blocking.

    ``check_only`` (the CLI): never make the self-signed pair (the server
    makes it, as its user); without one there is no certificate to check."""
    path = None if source.startswith("<") else Path(source)
    try:
        settings = load_settings(path, trusted_owners=trusted_config_owners())
    except ConfigError as exc:
        raise ReloadError(str(exc)) from None
    made = settings.tls_dir / CERT_NAME, settings.tls_dir / KEY_NAME
    if check_only and settings.tls.cert is None and not all(p.is_file() for p in made):
        return Loaded(settings, None)
    try:
        cert, key = cert_and_key(settings)
        tls = server_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ReloadError(f"TLS certificate or key: {exc}") from None
    return Loaded(settings, tls)


def _get(settings: Settings, key: str) -> object:
    value: object = settings
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _keep(settings: Settings, key: str, value: Any) -> Settings:
    section, _, name = key.partition(".")
    changes: dict[str, Any] = {section: value}
    if name:
        changes[section] = dataclasses.replace(getattr(settings, section), **{name: value})
    return dataclasses.replace(settings, **changes)


def effective(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with the restart-only keys of ``old``, and the keys that changed
    among those (they apply at the next start)."""
    waiting: list[str] = []
    result = new
    for key in RESTART_ONLY:
        before = _get(old, key)
        if before != _get(new, key):
            waiting.append(key)
            result = _keep(result, key, before)
    return result, waiting


def apply(services: Services, settings: Settings, tls: ssl.SSLContext | None) -> None:
    """Put ``settings`` (from ``effective``) and ``tls`` in force for new
    sessions and the outbound queue of this process."""
    services.settings = settings
    if tls is not None:
        services.tls = tls
    services.accounts.set_config_domains(settings.domains)
    if isinstance(services.outbound, Outbound):  # the delivering process's queue
        services.outbound.reconfigure(settings)
