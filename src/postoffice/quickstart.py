"""``postoffice init HOSTNAME DOMAIN``: a new server for a new domain in one step.

As mox's quickstart does: it writes a config for the host name and domain
(production ports, a data directory), makes the domain and its first user,
makes the DKIM keys, and prints the DNS records to publish, in the words
``postoffice doctor`` checks them by (doctor.py).
"""

from __future__ import annotations

from pathlib import Path

from postoffice.config.settings import ListenSettings, RunSettings
from postoffice.datadir import Owner
from postoffice.runas import RunAsError, identity

# The standard ports (RFC 5321, RFC 6409, RFC 8314, RFC 1939, RFC 9051), on
# every IPv4 address; add "[::]:25" and so on where the host has IPv6.
PRODUCTION_PORTS: dict[str, int] = {
    "smtp": 25,
    "submission": 587,
    "submissions": 465,
    "pop3": 110,
    "pop3s": 995,
    "imap": 143,
    "imaps": 993,
    # Client autoconfiguration (RFC 9110 ports); port 80 only redirects to 443.
    "http": 80,
    "https": 443,
}
# [listen] metrics keeps its loopback default: it asks for no login.
# ManageSieve stays off until asked for ([listen] managesieve = ["0.0.0.0:4190"]).
assert set(PRODUCTION_PORTS) == set(ListenSettings.__dataclass_fields__) - {
    "metrics",
    "managesieve",
}


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(hostname: str, domain: str, data_dir: Path, run_user: str) -> str:
    """The config ``init`` writes: everything else keeps its default."""
    listen = "\n".join(
        f"{name:<11} = [{_quoted(f'0.0.0.0:{port}')}]" for name, port in PRODUCTION_PORTS.items()
    )
    return (
        f"# Written by `postoffice init {hostname} {domain}`; README.md explains every key.\n"
        f"hostname = {_quoted(hostname)}\n"
        f"domains  = [{_quoted(domain)}]\n"
        f"data_dir = {_quoted(str(data_dir))}\n"
        "\n[listen]\n"
        f"{listen}\n"
        "\n[tls]  # a certificate for the host name (ACME); empty: self-signed\n"
        'cert = ""\n'
        'key  = ""\n'
        "\n[run]  # started as root: bind the ports, then run as this user\n"
        f"user = {_quoted(run_user)}\n"
    )


def run_owner(run: RunSettings) -> Owner | None:
    """Run as root with the [run] user present: who the data directory is
    for; else None (runas.py decides)."""
    try:
        return identity(run).owner
    except RunAsError:
        return None
