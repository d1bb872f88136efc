"""Which TLS a delivery needs: the per-destination policy and the order deciding it.

Order (issue #14; RFC 7672 §2.2, RFC 8461 §2): a usable DANE policy for
the MX host wins; else the domain's MTA-STS policy; else ``[relay] tls``:

* ``opportunistic`` (RFC 7435): STARTTLS when offered, nothing verified,
  plaintext when the handshake fails or TLS is not offered;
* ``verify``: STARTTLS required, the certificate verified against the
  system store plus ``[relay] ca_file`` and named for the MX host; any
  failure defers (never plaintext);
* ``dane-only``: mail goes only where DANE applies; elsewhere it waits.

``TlsPolicy`` is the small pure value remote.py acts on and TLS reports
(RFC 8460, policy/tls_rpt_store.py) read: its type, the policy text, the
policy domain, and on failure the §4.3 result type.  ``TlsPolicies`` finds
the domain's (MTA-STS through delivery/mta_sts_fetch.py); DANE's, per MX
host, comes from policy/dane.py in remote.py and wins (``decide``).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

from postoffice.config.settings import RelaySettings
from postoffice.delivery.mta_sts import StsPolicy
from postoffice.delivery.mta_sts_fetch import StsLookup, StsPolicySource
from postoffice.dns.resolver import Resolver
from postoffice.policy import tls_rpt_store
from postoffice.policy.dane import DanePolicy

OPPORTUNISTIC, VERIFY, DANE_ONLY = "opportunistic", "verify", "dane-only"
RELAY_TLS_MODES = (OPPORTUNISTIC, VERIFY, DANE_ONLY)
STS, DANE = "sts", "dane"
# RFC 8460 §4.3 result types we produce.
STARTTLS_NOT_SUPPORTED = tls_rpt_store.STARTTLS_NOT_SUPPORTED
VALIDATION_FAILURE = tls_rpt_store.VALIDATION_FAILURE
HOST_MISMATCH = "certificate-host-mismatch"
CERT_EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
# OpenSSL X509_V_ERR_* codes -> result types.
_VERIFY_CODES = {
    62: HOST_MISMATCH,  # X509_V_ERR_HOSTNAME_MISMATCH
    10: CERT_EXPIRED,  # X509_V_ERR_CERT_HAS_EXPIRED
    9: VALIDATION_FAILURE,  # X509_V_ERR_CERT_NOT_YET_VALID
    18: NOT_TRUSTED,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: NOT_TRUSTED,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20: NOT_TRUSTED,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: NOT_TRUSTED,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
}


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """What TLS one delivery needs, and where that requirement came from."""

    kind: str  # OPPORTUNISTIC, VERIFY, DANE_ONLY (no DANE found), STS or DANE
    enforce: bool = False  # a TLS failure defers the mail: never plaintext, never unverified
    verify: bool = False  # PKIX: system store + ca_file, certificate named for the MX host
    policy_domain: str = ""  # the domain whose policy this is (TLS-RPT's policy-domain)
    sts: StsPolicy | None = None  # the MTA-STS policy (kind STS)
    failure: str = ""  # RFC 8460 §4.3 result type when a policy could not be had
    dane: DanePolicy | None = None  # DANE (RFC 7672): the certificate checked against TLSA
    requiretls: bool = False  # for a REQUIRETLS message: a peer without TLS fails it for good

    @property
    def testing(self) -> bool:
        """MTA-STS testing mode: verify and report, deliver anyway (RFC 8461 §5)."""
        return self.kind == STS and not self.enforce

    @property
    def verified(self) -> bool:
        """Whether TLS under this policy is verified TLS (RFC 8689 §4.2.1:
        MTA-STS, in testing mode too, or DANE; [relay] tls = verify too)."""
        if self.kind == DANE:  # unusable TLSA records: encrypted, not authenticated
            return self.dane is not None and bool(self.dane.records)
        return self.kind in (VERIFY, STS)

    @property
    def policy_type(self) -> str:
        """RFC 8460 §4.1 policy-type."""
        return {STS: "sts", DANE: "tlsa"}.get(self.kind, "no-policy-found")

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """RFC 8460 §4.1 policy-string: the policy lines, or TLSA records."""
        if self.sts is not None:
            return self.sts.text
        if self.dane is not None:
            records = self.dane.records
            return tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records)
        return ()

    def report_policy(self) -> tls_rpt_store.TlsPolicy:
        """What a TLS report says this session was held to (RFC 8460 §4.4)."""
        mx = self.sts.mx if self.sts is not None else ()
        return tls_rpt_store.TlsPolicy(
            self.policy_type, self.policy_domain, self.policy_strings, mx
        )

    def allows_mx(self, host: str) -> bool:
        """RFC 8461 §4.1: under MTA-STS only MX hosts the policy names."""
        return self.sts is None or self.sts.allows(host)

    def names(self, host: str) -> tuple[str, ...]:
        """The names the MX certificate must carry (RFC 8461 §4.2: the MX
        host name, as looked up; RFC 7672 §3.2.3 for DANE alike)."""
        return (host.lower().removesuffix("."),)

    def reusable(self, host: str, tls_kind: str, verified: str) -> bool:
        """Whether a parked connection to ``host``, opened under a policy of
        kind ``tls_kind`` and authenticated as ``verified`` ("" if not), gives
        at least what this policy asks of a new one: the MX allowed, and
        verified TLS for any policy but opportunistic (MTA-STS testing too,
        whose sessions are verified and reported), DANE for ``dane-only``."""
        if not self.allows_mx(host):
            return False
        if self.kind == OPPORTUNISTIC:
            return True
        if self.kind == DANE_ONLY:
            return tls_kind == DANE and bool(verified)
        return bool(verified)

    def strict(self) -> TlsPolicy:
        """This policy for a REQUIRETLS message (RFC 8689 §4.2.1): failures
        defer, a peer without TLS bounces, MTA-STS testing counts as enforce."""
        return replace(self, enforce=True, requiretls=True)


def decide(mode: str, domain: str, sts: StsLookup, dane: DanePolicy | None = None) -> TlsPolicy:
    """The policy for ``domain`` (one MX host when ``dane`` is given): DANE >
    MTA-STS (mode "none" is no policy, RFC 8461 §5) > ``[relay] tls``."""
    if dane is not None:
        return TlsPolicy(DANE, enforce=True, policy_domain=domain, dane=dane)
    if sts.policy is not None and sts.policy.mode in ("enforce", "testing"):
        return TlsPolicy(
            STS,
            enforce=sts.policy.mode == "enforce",
            verify=True,
            policy_domain=domain,
            sts=sts.policy,
        )
    if mode == VERIFY:
        return TlsPolicy(VERIFY, enforce=True, verify=True, policy_domain=domain)
    if mode == DANE_ONLY:
        return TlsPolicy(DANE_ONLY, enforce=True, policy_domain=domain)
    return TlsPolicy(OPPORTUNISTIC, policy_domain=domain, failure=sts.failure)


def failure_type(exc: BaseException | None) -> str:
    """The RFC 8460 §4.3 result type of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, VALIDATION_FAILURE)
    return VALIDATION_FAILURE


def client_tls_context() -> ssl.SSLContext:
    """Opportunistic TLS: encrypt when we can, verify nothing (RFC 7435 §1.3)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def verifying_context(ca_file: str) -> ssl.SSLContext:
    """Verified TLS: the system store plus ``ca_file``, the host name checked
    (RFC 6125 as RFC 8461 §4.2 asks).  Blocking: reads the stores."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class TlsPolicies:
    """Finds each destination's ``TlsPolicy``; one per delivering process."""

    def __init__(
        self,
        relay: RelaySettings,
        data_dir: Path,
        resolver: Resolver,
    ) -> None:
        self._relay = relay
        self.sts = StsPolicySource(data_dir / "mta-sts", resolver, port=relay.mta_sts_port)
        self._verifying: tuple[str, ssl.SSLContext] | None = None
        self.opportunistic = client_tls_context()

    def reconfigure(self, relay: RelaySettings) -> None:
        """A reload: ``tls``, ``ca_file`` and the policy port apply to the next delivery."""
        self._relay = relay
        self.sts.reconfigure(relay.mta_sts_port)

    async def verifying(self) -> ssl.SSLContext:
        """The verifying context for the current ``ca_file`` (built off the loop)."""
        ca_file = self._relay.ca_file
        if self._verifying is None or self._verifying[0] != ca_file:
            self._verifying = (ca_file, await asyncio.to_thread(verifying_context, ca_file))
        return self._verifying[1]

    async def for_domain(self, domain: str) -> TlsPolicy:
        """The domain's policy before DANE is asked about its MX hosts."""
        sts = await self.sts.lookup(domain, await self.verifying())
        return decide(self._relay.tls, domain, sts)
