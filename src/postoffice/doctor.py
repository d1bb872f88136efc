"""``postoffice doctor [DOMAIN]``: which DNS records to publish, and are they right?

For this server (its ``hostname``) and each local domain it prints every
record that mail acceptance at the large providers depends on, as a
zone-file line, looks each one up (through ``[relay] dns_servers`` when
set, like every lookup of the server) and marks it:

* ``ok``: published and right;
* ``missing``: not published;
* ``wrong``: published but wrong, or DNS failed; the reason follows;
* ``warn``: works, but worth fixing (does not change the exit status).

Records: MX (RFC 5321 §5.1), the host's A/AAAA and the matching PTR
(forward-confirmed reverse DNS, which large providers require of senders),
SPF for the domain and the HELO name (RFC 7208), each active DKIM selector
(RFC 6376 §3.6.2), DMARC (RFC 7489 §6.1), TLS reporting (RFC 8460 §3),
our MTA-STS policy's record, host and certificate name (RFC 8461 §3), and
the smtp port's TLSA record for the current certificate (RFC 7672, "3 1 1";
optional, but a stale one is wrong).  It also checks the TLS certificate
(expiry, names) and that each configured listener answers.
Exit status: 0 when nothing is missing or wrong, 1 otherwise.

The resolver is asked once first (the root's NS, which any resolver answers
from its hints): if that times out, no record is looked up, so a dead DNS
server costs one timeout, not one per record.  An A/AAAA record of a public
host name that points at a private, loopback or otherwise non-global address
is wrong: other mail servers cannot reach it there.  Names under the
special-use domains (.test, .example, .localhost, .invalid, home.arpa... RFC
6761, RFC 8375) are test setups and may point anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from postoffice.cluster.stores import load_dkim_keys
from postoffice.config.client_endpoints import all_services, endpoints
from postoffice.config.settings import ListenAddress, ListenSettings, MtaStsSettings, Settings
from postoffice.dns.mx import MxRecord
from postoffice.dns.resolver import DnsError, DnsResolver, Resolver
from postoffice.net import mta_sts
from postoffice.net.tls import served_certificate
from postoffice.policy import dmarc, spf
from postoffice.policy.dkim_keys import DkimKey, DkimKeyError, txt_record, zone_txt

LOOKUP_LIFETIME = 10.0  # seconds per DNS question
PROBE_LIFETIME = 5.0  # seconds the first question may take before DNS counts as down
# RFC 2606, 6761, 6762, 8375, 9476 and ICANN's .internal: never on the public Internet.
SPECIAL_USE = frozenset(
    {"test", "example", "invalid", "localhost", "local", "onion", "alt", "internal", "home.arpa"}
)
CONNECT_TIMEOUT = 5.0  # seconds to connect to a listener and read its greeting
CERT_WARN_DAYS = 14
UNKNOWN_IP = "192.0.2.255"  # TEST-NET-1 (RFC 5737): no real sender; an SPF pass for it is +all

OK, MISSING, WRONG, WARN = "ok", "missing", "wrong", "warn"


@dataclass(frozen=True, slots=True)
class Finding:
    status: str
    record: str  # a zone-file line, or what was checked
    reason: str = ""

    @property
    def bad(self) -> bool:
        return self.status in (MISSING, WRONG)


@dataclass
class Section:
    title: str
    findings: list[Finding]


def _txt(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the records a domain needs (the doctor checks them, `init` prints them) -----------
def mx_line(domain: str, hostname: str) -> str:
    return f"{domain}. IN MX 10 {hostname}."


def spf_line(domain: str) -> str:
    """The domain's SPF: its MX hosts send its mail (RFC 7208)."""
    return f"{domain}. IN TXT {_txt('v=spf1 mx -all')}"


def helo_spf_line(hostname: str) -> str:
    """The HELO name's own SPF (RFC 7208 §2.3): this host sends as itself."""
    return f"{hostname}. IN TXT {_txt('v=spf1 a -all')}"


def dmarc_text(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; adkim=r; aspf=r; rua=mailto:postmaster@{domain}"


def dmarc_line(domain: str) -> str:
    return f"_dmarc.{domain}. IN TXT {_txt(dmarc_text(domain))}"


def srv_lines(domain: str, hostname: str, listen: ListenSettings) -> list[tuple[str, str, int]]:
    """(zone-file line, SRV name, port; 0: not offered) of each client service
    (RFC 6186 §3, _submissions RFC 8314 §5.1), priorities from
    config/client_endpoints.py (implicit TLS first).  A service that is off
    gets the "." target, which says it is decidedly not offered (RFC 2782,
    RFC 6186 §4), so clients do not try it."""
    on = {e.srv_service: e for e in endpoints(listen, hostname)}
    lines = []
    for _listener, label in all_services():
        name = f"{label}.{domain}"
        found = on.get(label)
        if found is None:
            lines.append((f"{name}. IN SRV 0 0 0 .", name, 0))
        else:
            line = f"{name}. IN SRV {found.srv_priority} 1 {found.port} {hostname}."
            lines.append((line, name, found.port))
    return lines


def autoconfig_lines(domain: str, hostname: str, listen: ListenSettings) -> list[str]:
    """With [listen] https on: the names clients look up for autoconfiguration
    (Thunderbird autoconfig.<domain>, Outlook autodiscover.<domain> and
    _autodiscover._tcp), pointing at this host."""
    if not listen.https:
        return []
    port = listen.https[0].port
    return [
        f"autoconfig.{domain}. IN CNAME {hostname}.",
        f"autodiscover.{domain}. IN CNAME {hostname}.",
        f"_autodiscover._tcp.{domain}. IN SRV 0 1 {port} {hostname}.",
    ]


def tls_rpt_text(domain: str) -> str:
    """Where other servers send TLS reports about mail to ``domain`` (RFC 8460 §3)."""
    return f"v=TLSRPTv1; rua=mailto:postmaster@{domain}"


def tls_rpt_line(domain: str) -> str:
    return f"_smtp._tls.{domain}. IN TXT {_txt(tls_rpt_text(domain))}"


def mta_sts_lines(domain: str, hostname: str, policy: MtaStsSettings) -> list[str]:
    """With [mta_sts] mode testing or enforce: the policy's TXT record (its
    id a hash of the policy, RFC 8461 §3.1) and the name its https host has."""
    return [
        f"_mta-sts.{domain}. IN TXT {_txt(mta_sts.txt_text(hostname, policy))}",
        f"mta-sts.{domain}. IN CNAME {hostname}.",
    ]


def tlsa_line(hostname: str, cert: x509.Certificate) -> str:
    """DANE-EE (3), the public key (1), SHA-256 (1): RFC 7672 §3.1.1's
    recommended form, which survives a renewal that keeps the key."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"_25._tcp.{hostname}. IN TLSA 3 1 1 {hashlib.sha256(spki).hexdigest()}"


def records_to_publish(
    hostname: str,
    domain: str,
    keys: Sequence[DkimKey],
    listen: ListenSettings | None = None,
    policy: MtaStsSettings | None = None,
) -> list[str]:
    """Every zone-file line a new domain on this host needs, in the doctor's words."""
    lines = [mx_line(domain, hostname), spf_line(domain)]
    if hostname != domain:
        lines.append(helo_spf_line(hostname))
    lines += [zone_txt(key.dns_name, txt_record(key)) for key in keys]
    lines.append(dmarc_line(domain))
    lines.append(tls_rpt_line(domain))
    if listen is not None:
        lines += [line for line, _name, _port in srv_lines(domain, hostname, listen)]
        lines += autoconfig_lines(domain, hostname, listen)
        if listen.https and policy is not None and policy.mode != "none":
            lines += mta_sts_lines(domain, hostname, policy)
    return lines


class Doctor:
    def __init__(
        self,
        settings: Settings,
        resolver: Resolver,
        domains: Sequence[str],
        certificate: list[Finding] | None = None,
    ) -> None:
        self.settings = settings
        self.certificate = certificate  # checked already (as root), else here
        self.domains = list(domains)
        self.r = resolver
        self.hostname = settings.hostname
        self.server_ips: list[str] = []

    async def _txt_records(self, name: str) -> tuple[list[str] | None, str]:
        """(records, problem): None and the problem when the lookup failed."""
        try:
            return await self.r.txt(name), ""
        except DnsError as exc:
            if exc.temporary:
                return None, f"DNS lookup failed: {exc}"
            return [], ""

    # --- this server -------------------------------------------------------------------
    async def server(self) -> Section:
        host = self.hostname
        findings: list[Finding] = []
        try:
            self.server_ips = await self.r.addresses(host)
        except DnsError as exc:
            findings.append(Finding(WRONG, f"{host}. IN A ...", f"DNS lookup failed: {exc}"))
        else:
            findings += self._address_findings()
        for ip in self.server_ips:
            findings.append(await self._ptr(ip))
        if host not in self.domains:  # else the domain's own SPF check covers it
            findings.append(await self._helo_spf())
        findings += self.certificate or check_certificate(self.settings)
        findings += await check_listeners(self.settings)
        return Section(f"{host} (this server)", findings)

    def _address_findings(self) -> list[Finding]:
        host = self.hostname
        if not self.server_ips:
            return [
                Finding(
                    MISSING,
                    f"{host}. IN A <this server's public IPv4 address>",
                    f"{host} has no A or AAAA record: other servers cannot find this one",
                )
            ]
        out = []
        listening = {a.host for a in self.settings.listen.smtp}
        specific = {h for h in listening if h not in ("0.0.0.0", "::", "")}
        for ip in self.server_ips:
            kind = "AAAA" if ":" in ip else "A"
            line = f"{host}. IN {kind} {ip}"
            unreachable = _not_public(ip)
            if unreachable and is_public_name(host):
                out.append(
                    Finding(
                        WRONG,
                        line,
                        f"{ip} is a {unreachable} address: other mail servers cannot reach"
                        f" {host} there; publish this server's public address",
                    )
                )
            else:
                out.append(Finding(OK, line))
        if specific and listening == specific and not specific & set(self.server_ips):
            out.append(
                Finding(
                    WRONG,
                    f"[listen] smtp = {sorted(specific)}",
                    f"{host} resolves to {', '.join(self.server_ips)}, but the smtp"
                    " listener is not on any of those addresses",
                )
            )
        return out

    async def _ptr(self, ip: str) -> Finding:
        host = self.hostname
        reverse = ipaddress.ip_address(ip).reverse_pointer
        line = f"{reverse}. IN PTR {host}."
        try:
            names = await self.r.ptr(ip)
        except DnsError as exc:
            return Finding(WRONG, line, f"DNS lookup failed: {exc}")
        if not names:
            return Finding(
                MISSING,
                line,
                f"no reverse DNS for {ip}; large providers refuse mail from addresses without"
                " one (set it in your hosting provider's panel)",
            )
        if host in names:
            return Finding(OK, line)
        return Finding(
            WRONG, line, f"{ip} points back to {', '.join(names)}, not to {host} (the HELO name)"
        )

    async def _helo_spf(self) -> Finding:
        host = self.hostname
        line = helo_spf_line(host)
        records, problem = await self._txt_records(host)
        if records is None:
            return Finding(WRONG, line, problem)
        if not [t for t in records if spf.is_spf_record(t)]:
            return Finding(
                WARN, line, "no SPF record for the HELO name (recommended, RFC 7208 §2.3)"
            )
        return await self._spf_verdict(host, line, records)

    # --- a domain ------------------------------------------------------------------------------
    async def domain(self, domain: str) -> Section:
        findings = [await self._mx(domain)]
        records, problem = await self._txt_records(domain)
        want_spf = spf_line(domain)
        if records is None:
            findings.append(Finding(WRONG, want_spf, problem))
        elif not [t for t in records if spf.is_spf_record(t)]:
            findings.append(Finding(MISSING, want_spf, f"no SPF record at {domain}"))
        else:
            findings.append(await self._spf_verdict(domain, want_spf, records))
        findings += await self._dkim(domain)
        findings.append(await self._dmarc(domain))
        findings += await self._client_records(domain)
        findings.append(await self._tls_rpt(domain))
        findings += await self._mta_sts(domain)
        return Section(domain, findings)

    async def _tls_rpt(self, domain: str) -> Finding:
        line = tls_rpt_line(domain)
        records, problem = await self._txt_records(f"_smtp._tls.{domain}")
        if records is None:
            return Finding(WRONG, line, problem)
        found = [t for t in records if t.startswith("v=TLSRPTv1")]
        if len(found) > 1:  # RFC 8460 §3: senders then ignore them all
            return Finding(WRONG, line, f"{len(found)} TLSRPT records: senders ignore them all")
        if not found:
            return Finding(
                WARN, line, "optional: senders' reports of TLS failures on mail to you (RFC 8460)"
            )
        if "rua=" not in found[0]:
            return Finding(WRONG, line, f"published {_txt(found[0])} names no rua=")
        return Finding(OK, line)

    async def _mta_sts(self, domain: str) -> list[Finding]:
        """Our policy's TXT record (its id must be the served policy's, or
        senders keep a cached older one, RFC 8461 §3.1), the policy host's
        name, and the certificate that host shows (senders verify it, §3.3)."""
        settings = self.settings
        policy = settings.mta_sts
        txt_line, host_line = mta_sts_lines(domain, self.hostname, policy)
        want = mta_sts.txt_text(self.hostname, policy)
        records, problem = await self._txt_records(f"_mta-sts.{domain}")
        if records is None:
            return [Finding(WRONG, txt_line, problem)]
        found = [t for t in records if t.startswith("v=STSv1")]
        if policy.mode == "none":
            if not found or want in found:
                return [Finding(OK, f"_mta-sts.{domain}", "[mta_sts] mode = none: no policy")]
            return [
                Finding(
                    WRONG,
                    txt_line,
                    f"published {_txt(found[0])}: publish this id so senders fetch"
                    " mode: none (RFC 8461 §8.3), and keep serving it for max_age",
                )
            ]
        if not settings.listen.https:
            return [
                Finding(
                    WRONG,
                    f"[mta_sts] mode = {policy.mode}",
                    "the policy is served on [listen] https, which is off",
                )
            ]
        findings = []
        if not found:
            findings.append(Finding(MISSING, txt_line, f"no MTA-STS record at _mta-sts.{domain}"))
        elif want not in found:
            findings.append(
                Finding(
                    WRONG,
                    txt_line,
                    f"published {_txt(found[0])}: another policy's id; senders keep their"
                    " cached policy until the id changes",
                )
            )
        else:
            findings.append(Finding(OK, txt_line, f"mode {policy.mode}"))
        findings.append(await self._points_here(f"mta-sts.{domain}"))
        cert = _read_certificate(settings)
        if cert is not None and not any(
            _name_matches(n, f"mta-sts.{domain}") for n in _names(cert)
        ):
            findings.append(
                Finding(
                    WRONG,
                    host_line,
                    f"the certificate is not for mta-sts.{domain}: senders cannot fetch the"
                    " policy (add the name to it)",
                )
            )
        return findings

    async def _client_records(self, domain: str) -> list[Finding]:
        """RFC 6186 SRV records and the autoconfiguration names."""
        listen = self.settings.listen
        findings = []
        for line, name, port in srv_lines(domain, self.hostname, listen):
            findings.append(await self._srv(line, name, port))
        if listen.https:
            port = listen.https[0].port
            findings.append(
                await self._srv(
                    autoconfig_lines(domain, self.hostname, listen)[2],
                    f"_autodiscover._tcp.{domain}",
                    port,
                )
            )
            for prefix in ("autoconfig", "autodiscover"):
                findings.append(await self._points_here(f"{prefix}.{domain}"))
        return findings

    async def _srv(self, line: str, name: str, port: int) -> Finding:
        try:
            records = await self.r.srv(name)
        except DnsError as exc:
            return Finding(WRONG, line, f"DNS lookup failed: {exc}")
        offered = [r for r in records if r.target]
        if port == 0:  # the listener is off
            if offered:
                where = ", ".join(f"{r.target}:{r.port}" for r in offered)
                return Finding(WRONG, line, f"{name} offers {where}, but that listener is off here")
            return Finding(OK, line, "" if records else "optional: the listener is off")
        if any(r.target == self.hostname and r.port == port for r in offered):
            return Finding(OK, line)
        if not records:  # recommended, not required: most clients guess or autoconfigure
            return Finding(
                WARN,
                line,
                f"no SRV record at {name}: clients that look services up (RFC 6186) will not"
                " find this one",
            )
        if not offered:
            return Finding(WRONG, line, f"{name} says the service is not offered (target .)")
        where = ", ".join(f"{r.target}:{r.port}" for r in offered)
        return Finding(WRONG, line, f"{name} points to {where}, not to {self.hostname}:{port}")

    async def _points_here(self, name: str) -> Finding:
        line = f"{name}. IN CNAME {self.hostname}."
        try:
            found = await self.r.addresses(name)
            ours = self.server_ips or await self.r.addresses(self.hostname)
        except DnsError as exc:
            return Finding(WRONG, line, f"DNS lookup failed: {exc}")
        if not found:
            return Finding(
                MISSING, line, f"{name} does not resolve: mail clients cannot find their settings"
            )
        if ours and not set(found) & set(ours):
            return Finding(
                WRONG, line, f"{name} resolves to {', '.join(found)}, not to {self.hostname}"
            )
        return Finding(OK, line)

    async def _mx(self, domain: str) -> Finding:
        line = mx_line(domain, self.hostname)
        try:
            records: list[MxRecord] = await self.r.mx(domain)
        except DnsError as exc:
            if exc.temporary:
                return Finding(WRONG, line, f"DNS lookup failed: {exc}")
            return Finding(MISSING, line, f"{domain} does not exist in DNS")
        hosts = [r.host for r in sorted(records, key=lambda r: r.preference)]
        if not hosts:
            return Finding(MISSING, line, f"{domain} has no MX record")
        if hosts == [""]:
            return Finding(WRONG, line, f"{domain} has a null MX: it says it takes no mail")
        if self.hostname in hosts:
            others = [h for h in hosts if h != self.hostname]
            return Finding(OK, line, f"also: {', '.join(others)}" if others else "")
        return Finding(WRONG, line, f"MX points to {', '.join(hosts)}, not to {self.hostname}")

    async def _spf_verdict(self, domain: str, line: str, records: list[str]) -> Finding:
        found = [t for t in records if spf.is_spf_record(t)]
        if len(found) > 1:
            return Finding(
                WRONG, line, f"{len(found)} SPF records; receivers treat that as an error (§4.5)"
            )
        sender = ("postmaster", domain)
        anyone = await spf.check_host(self.r, UNKNOWN_IP, domain, sender, self.hostname)
        if anyone.result is spf.SpfResult.PASS:
            return Finding(WRONG, line, f"published {_txt(found[0])} lets any address send")
        if not self.server_ips:
            return Finding(
                WARN, line, f"cannot test {_txt(found[0])}: {self.hostname} has no address"
            )
        for ip in self.server_ips:
            verdict = await spf.check_host(self.r, ip, domain, sender, self.hostname)
            if verdict.result is not spf.SpfResult.PASS:
                return Finding(
                    WRONG,
                    line,
                    f"published {_txt(found[0])} gives {verdict.result} for this server's"
                    f" address {ip} ({verdict.reason})",
                )
        return Finding(OK, line)

    async def _dkim(self, domain: str) -> list[Finding]:
        try:
            keys = load_dkim_keys(self.settings, domain)
        except DkimKeyError as exc:
            return [Finding(WRONG, f"DKIM keys of {domain}", str(exc))]
        if not keys:
            return [
                Finding(
                    MISSING,
                    f'<selector>._domainkey.{domain}. IN TXT "v=DKIM1; k=rsa; p=..."',
                    f"no DKIM keys yet: run `postoffice dkim generate {domain}`, then publish"
                    " the records it prints",
                )
            ]
        return [await self._dkim_key(key) for key in keys]

    async def _dkim_key(self, key: DkimKey) -> Finding:
        try:
            want = txt_record(key)
        except DkimKeyError as exc:
            return Finding(WRONG, key.dns_name, str(exc))
        line = zone_txt(key.dns_name, want)
        records, problem = await self._txt_records(key.dns_name)
        if records is None:
            return Finding(WRONG, line, problem)
        if not records:
            return Finding(MISSING, line, f"no TXT record at {key.dns_name}")
        ours = dict(_tags(want))
        for text in records:
            tags = dict(_tags(text))
            p = "".join(tags.get("p", "").split())
            if p == ours["p"] and tags.get("k", "rsa") == ours["k"]:
                return Finding(OK, line)
        published = dict(_tags(records[0]))
        if "p" in published and not published["p"]:
            return Finding(WRONG, line, "the published key is revoked (empty p=)")
        return Finding(
            WRONG, line, f"{key.dns_name} has a different key than {key.where} (an old one?)"
        )

    async def _dmarc(self, domain: str) -> Finding:
        line = dmarc_line(domain)
        records, problem = await self._txt_records(f"_dmarc.{domain}")
        if records is None:
            return Finding(WRONG, line, problem)
        found = [t for t in records if dmarc.is_dmarc_record(t)]
        if len(found) > 1:
            return Finding(WRONG, line, f"{len(found)} DMARC records: receivers ignore them all")
        if not found:
            org = dmarc.organizational_domain(domain)
            if org != domain:
                try:
                    inherited = await dmarc.discover(self.r, domain)
                except dmarc.DmarcTempError as exc:
                    return Finding(WRONG, line, f"DNS lookup failed: {exc}")
                if inherited is not None:
                    return Finding(OK, line, f"the policy of _dmarc.{org} applies")
            return Finding(MISSING, line, f"no DMARC record at _dmarc.{domain}")
        record = dmarc.parse_record(found[0], domain)
        if record is None:
            return Finding(WRONG, line, f"published {_txt(found[0])} has no valid p= tag")
        if record.policy == "none":
            return Finding(
                WARN, line, "p=none: receivers only report failures; move to quarantine or reject"
            )
        return Finding(OK, line, f"p={record.policy}")


def is_public_name(name: str) -> bool:
    """False for names under a special-use domain (SPECIAL_USE) or without a dot."""
    labels = name.lower().rstrip(".").split(".")
    if len(labels) < 2:
        return False
    if labels[-1] in SPECIAL_USE or ".".join(labels[-2:]) in SPECIAL_USE:
        return False
    # RFC 2606 §3: the second-level example domains.
    return ".".join(labels[-2:]) not in ("example.com", "example.net", "example.org")


def _not_public(ip: str) -> str:
    """What kind of address ``ip`` is, if not one reachable from the Internet; ""."""
    address = ipaddress.ip_address(ip)
    for kind, test in (
        ("loopback", address.is_loopback),
        ("private", address.is_private),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("multicast", address.is_multicast),
    ):
        if test:
            return kind
    return "" if address.is_global else "non-global"


def _tags(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


# --- certificate and listeners ----------------------------------------------------------------
def _cert_path(settings: Settings) -> Path:
    return served_certificate(settings)[1]  # ACME's once issued


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [
            str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]


def _name_matches(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    # RFC 6125 §6.4.3: "*." covers exactly one left-most label.
    return pattern.startswith("*.") and host.split(".", 1)[-1] == pattern[2:] and "." in host


def check_certificate(settings: Settings, now: datetime.datetime | None = None) -> list[Finding]:
    path = _cert_path(settings)
    label = f"TLS certificate {path}"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return [Finding(WARN, label, "not made yet: a self-signed one is made on first start")]
    except (OSError, ValueError) as exc:
        return [Finding(WRONG, label, f"cannot be read: {exc}")]
    findings = []
    now = now or datetime.datetime.now(datetime.UTC)
    expires = cert.not_valid_after_utc
    host = settings.hostname
    names = _names(cert)
    if expires <= now:
        findings.append(Finding(WRONG, label, f"expired on {expires:%Y-%m-%d}"))
    elif expires - now < datetime.timedelta(days=CERT_WARN_DAYS):
        findings.append(Finding(WARN, label, f"expires on {expires:%Y-%m-%d}: renew it"))
    if not any(_name_matches(n, host) for n in names):
        findings.append(
            Finding(WRONG, label, f"made for {', '.join(names) or 'no name'}, not for {host}")
        )
    if cert.issuer == cert.subject:
        findings.append(
            Finding(
                WARN,
                label,
                "self-signed: other mail servers accept it, mail clients warn; use one from a"
                " certificate authority (e.g. Let's Encrypt) in [tls]",
            )
        )
    if not findings:
        findings.append(Finding(OK, label, f"valid until {expires:%Y-%m-%d}, for {host}"))
    return findings


def _read_certificate(settings: Settings) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(_cert_path(settings).read_bytes())
    except (OSError, ValueError):
        return None


async def check_tlsa(settings: Settings, resolver: DnsResolver) -> Finding:
    """The TLSA record of the smtp port for the current certificate (RFC
    7672): optional (it needs a DNSSEC-signed zone), but one that matches no
    published record makes DANE senders defer all mail (§2.2), so wrong."""
    cert = _read_certificate(settings)
    host = settings.hostname
    if cert is None:
        return Finding(WARN, f"_25._tcp.{host}. IN TLSA 3 1 1 ...", "no certificate to read yet")
    line = tlsa_line(host, cert)
    try:
        found, _secure = await resolver.tlsa(host, 25)
    except DnsError as exc:
        return Finding(WRONG, line, f"DNS lookup failed: {exc}")
    want = line.rsplit(" ", 1)[1]
    records = [(r.usage, r.selector, r.mtype, r.data.hex()) for r in found]
    if not records:
        return Finding(
            WARN, line, "optional: DANE (RFC 7672) for senders that check it; needs DNSSEC"
        )
    if (3, 1, 1, want) in records:
        return Finding(OK, line)
    return Finding(
        WRONG,
        line,
        f"{len(records)} TLSA record(s) at _25._tcp.{host}, none for the current certificate:"
        " DANE senders will defer mail; publish this one (keep the old until caches expire)",
    )


_GREETINGS = {
    "smtp": (b"220", False),
    "submission": (b"220", False),
    "submissions": (b"220", True),
    "pop3": (b"+OK", False),
    "pop3s": (b"+OK", True),
    "imap": (b"* OK", False),
    "imaps": (b"* OK", True),
    "managesieve": (b'"IMPLEMENTATION"', False),  # RFC 5804 §1.7: capabilities first
}


async def _greeting(address: ListenAddress, implicit_tls: bool) -> bytes:
    host = address.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    ctx = None
    if implicit_tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(CONNECT_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, address.port, ssl=ctx)
        try:
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def check_listeners(settings: Settings) -> list[Finding]:
    findings = []
    for name, (expected, implicit_tls) in _GREETINGS.items():
        for address in getattr(settings.listen, name):
            label = f"{name} listener {address}"
            try:
                line = await _greeting(address, implicit_tls)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                reason = str(exc) or type(exc).__name__
                findings.append(
                    Finding(WRONG, label, f"does not answer ({reason}); is it running?")
                )
                continue
            text = line.decode("utf-8", "replace").strip()
            if not line.startswith(expected):
                findings.append(Finding(WRONG, label, f"answers {text!r}"))
                continue
            finding = Finding(OK, label, text[:80])
            if name == "smtp" and ipaddress.ip_address(address.host or "0.0.0.0").is_loopback:
                finding = Finding(WARN, label, "on loopback only: other servers cannot reach it")
            findings.append(finding)
    return findings


# --- the command ----------------------------------------------------------------------------------
async def diagnose(
    settings: Settings,
    resolver: DnsResolver,
    domains: Sequence[str],
    certificate: list[Finding] | None = None,
) -> list[Section]:
    """``resolver``: on ``[relay] dns_servers``, LOOKUP_LIFETIME per question.
    ``certificate``: check_certificate's findings, when they were made
    before the CLI stopped being root."""
    dead = await resolver.unreachable(lifetime=PROBE_LIFETIME)
    if dead:
        servers = ", ".join(str(s) for s in settings.relay.dns_servers) or "the system resolver"
        findings = [
            Finding(
                WRONG,
                f"DNS resolver {servers}",
                f"does not answer ({dead}); no record was checked: fix [relay] dns_servers"
                " (or /etc/resolv.conf), then run the doctor again",
            ),
            *(certificate or check_certificate(settings)),
            *await check_listeners(settings),
        ]
        return [Section(f"{settings.hostname} (this server)", findings)]
    doctor = Doctor(settings, resolver, domains, certificate)
    sections = [await doctor.server()]
    sections[0].findings.append(await check_tlsa(settings, resolver))
    for domain in domains:
        sections.append(await doctor.domain(domain))
    return sections


def report(sections: Sequence[Section], out: TextIO) -> int:
    """Print the sections; the number of missing or wrong findings."""
    bad = 0
    for section in sections:
        print(f"\n== {section.title}", file=out)
        for f in section.findings:
            print(f"{f.status:<8} {f.record}", file=out)
            if f.reason:
                print(f"{'':<8} {f.reason}", file=out)
            bad += f.bad
    return bad


def run_doctor(
    settings: Settings,
    resolver: DnsResolver,
    domains: Sequence[str],
    out: TextIO = sys.stdout,
    certificate: list[Finding] | None = None,
) -> int:
    servers = ", ".join(str(s) for s in settings.relay.dns_servers) or "the system resolver"
    print(
        f"postoffice doctor: {settings.hostname}, domains {', '.join(domains) or '(none)'};"
        f" DNS through {servers}",
        file=out,
    )
    print("Each record as a zone-file line, then whether DNS has it right.", file=out)
    bad = report(asyncio.run(diagnose(settings, resolver, domains, certificate)), out)
    if bad:
        print(f"\n{bad} problem(s): publish or fix the records marked missing or wrong,", file=out)
        print("then run `postoffice doctor` again (DNS changes can take a while).", file=out)
        return 1
    print("\nAll required records are in place.", file=out)
    return 0
