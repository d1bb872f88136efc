"""``postoffice cert status``: the certificate the server serves, and when it
is renewed (net/acme_renewal.py writes the plan to data_dir/acme/renewal.json);
what of a certificate both the CLI and net/acme.py read, without certbot's
``acme`` (every CLI command imports this module)."""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from postoffice.config.settings import Settings
from postoffice.net.tls import served_certificate
from postoffice.storage.safeio import atomic_write

RENEWAL = "renewal.json"


def acme_dir(settings: Settings) -> Path:
    return settings.data_dir / "acme"


def certificate_names(settings: Settings) -> list[str]:
    """The names the certificate must hold: the hostname, [acme] names, and,
    with the https listener on, the names mail clients and senders fetch
    from it (autoconfig.<domain>, mta-sts.<domain>: RFC 8461 §3.3)."""
    names = [settings.hostname, *settings.acme.names]
    if settings.listen.https:
        for domain in settings.domains:
            names += [f"mta-sts.{domain}", f"autoconfig.{domain}"]
    return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    names: tuple[str, ...]
    issuer: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def default_renewal(self) -> datetime.datetime:
        """At 2/3 of the lifetime, as certbot does without ARI: a 90-day
        certificate is renewed 30 days ahead, leaving room for retries."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


def certificate_info(pem: bytes) -> CertificateInfo:
    """The first (leaf) certificate of a PEM chain."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateInfo(
        names=names,
        issuer=str(issuer[0].value) if issuer else cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def read_renewal(settings: Settings) -> dict[str, str]:
    """What the server last wrote to renewal.json ({} if nothing)."""
    try:
        data = json.loads((acme_dir(settings) / RENEWAL).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_renewal(settings: Settings, state: dict[str, str]) -> None:
    directory = acme_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(directory / RENEWAL, json.dumps(state, indent=1).encode(), 0o644)


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """What ``cert status`` and the admin page's DNS health show."""

    path: Path
    kind: str  # served_certificate's word: "acme", "configured", "self-signed"...
    info: CertificateInfo | None
    problem: str  # why ``info`` is None; "" otherwise
    acme_pending: str  # names ACME has issued nothing for yet; "" when none or no [acme]
    next_renewal: str  # when, and by what rule; "by hand" without [acme]
    last_error: str  # the last failed renewal's reason; ""


def certificate_status(settings: Settings) -> CertificateStatus:
    """The served certificate and its renewal plan (blocking: reads files)."""
    kind, path = served_certificate(settings)
    plan = read_renewal(settings) if settings.acme.directory else {}
    try:
        info: CertificateInfo | None = certificate_info(path.read_bytes())
        problem = ""
    except (OSError, ValueError) as exc:
        info, problem = None, str(exc)
    if settings.acme.directory:
        pending = ", ".join(certificate_names(settings)) if kind != "acme" else ""
        when = plan.get("next_renewal", "at the server's next start")
        next_renewal = when + (f" ({plan['by']})" if "by" in plan else "")
    else:
        pending, next_renewal = "", "by hand (no [acme] in the config)"
    return CertificateStatus(
        path, kind, info, problem, pending, next_renewal, plan.get("last_error", "")
    )


def cert_status(args: argparse.Namespace, settings: Settings) -> int:
    status = certificate_status(settings)
    print(f"certificate   {status.path} ({status.kind})")
    info = status.info
    if info is None:
        print(f"  not readable: {status.problem}")
    else:
        print(f"  names       {', '.join(info.names)}")
        print(f"  issuer      {info.issuer}")
        print(f"  not after   {info.not_after.isoformat(timespec='seconds')}")
    if status.acme_pending:
        print(f"  acme        none issued yet for {status.acme_pending}")
    print(f"  next renewal {status.next_renewal}")
    if status.last_error:
        print(f"  last error  {status.last_error}")
    return 0 if info is not None else 1


def add_cert_parser(subparsers: Any) -> None:
    """Add ``cert status`` to the CLI's subcommands."""
    summary = "the server's TLS certificate: names, issuer, expiry, next renewal"
    group = subparsers.add_parser(
        "cert", help=summary, description=summary, epilog="example:\n  postoffice cert status\n"
    )
    group.set_defaults(handler=None, help_parser=group)
    commands = group.add_subparsers(title="commands", metavar="COMMAND")
    text = "show the certificate served and when it is renewed ([acme])"
    parser = commands.add_parser("status", help=text, description=text)
    parser.set_defaults(handler=cert_status)
