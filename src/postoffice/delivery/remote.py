"""The remote courier: finds the next hop and hands the message over by SMTP.

Routing (RFC 5321 §5.1): the smarthost if one is set; an address literal
goes straight to that address; otherwise the MX records in the order
``mx.order_mx`` gives, or the domain itself as implicit MX when it has none.
Each host's addresses (IPv6 first, then IPv4) are tried in turn until one
gives a definite answer for the recipients; connection failures, 4xx
greetings and 4xx answers to EHLO/MAIL move on to the next address or host.

A message with 8-bit content goes to a peer without 8BITMIME converted to
7 bits (delivery/downgrade.py, RFC 6152 §3) and, when we had signed it,
signed again; one that needs SMTPUTF8 goes nowhere without it (RFC 6531
§3.2: returned with 5.6.7).

TLS follows the destination's ``TlsPolicy`` (delivery/tls_policy.py: DANE
> MTA-STS > ``[relay] tls``).  Opportunistic (RFC 3207, RFC 7435):
STARTTLS whenever offered, certificates not verified; if the handshake
fails the same address is tried once more in plaintext.  Enforced (MTA-STS
enforce, ``tls = "verify"``, DANE): only MX hosts the policy allows, STARTTLS
required, the certificate verified (under DANE, RFC 7672 and policy/dane.py:
when the MX and TLSA RRsets are DNSSEC-authenticated, against the TLSA
records); any failure defers (4.7.5), never plaintext.  MTA-STS testing:
verified first, the failure logged and reported, then as opportunistic.
A REQUIRETLS message (RFC 8689 §4.2.1) goes only over verified TLS to a
peer offering REQUIRETLS, else bounces (5.7.10).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import logging
import random
import re
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from postoffice.config.settings import RelaySettings
from postoffice.delivery.conncache import ConnectionCache, Parked
from postoffice.delivery.content import MessageTraits, TraitScanner
from postoffice.delivery.courier import (
    MessageSource,
    Outcome,
    RecipientResult,
    outcome_of,
    status_of,
)
from postoffice.delivery.downgrade import DowngradeError, to_7bit
from postoffice.delivery.mta_sts_fetch import StsLookup
from postoffice.delivery.smtp_connection import ClientTimeouts, SmtpClient, SmtpConnectionError
from postoffice.delivery.tls_policy import (
    DANE_ONLY,
    STARTTLS_NOT_SUPPORTED,
    VALIDATION_FAILURE,
    TlsPolicies,
    TlsPolicy,
    client_tls_context,
    decide,
    failure_type,
    verifying_context,
)
from postoffice.dns.mx import MxLoopsToSelf, NullMx, order_mx
from postoffice.dns.resolver import DnsError, Resolver
from postoffice.mail.address import Address
from postoffice.policy import dane
from postoffice.policy.dkim_sign import DkimSigner
from postoffice.policy.tls_rpt_store import TLSA_INVALID, TlsFailure, TlsReportRecorder
from postoffice.protocol.smtp_reply import Reply

log = logging.getLogger("postoffice.delivery")

MAX_PARKED_TRIES = 3  # parked connections tried (each may have gone stale) before a new one
RCPTS_PER_TRANSACTION = 100  # RFC 5321 §4.5.3.1.8: the minimum every server must take
SEND_BLOCK = 64 * 1024  # a converted message goes out in blocks of this size
# Our own signatures: DKIM-Signature fields on top of the message, where
# the signing queue writer puts them (policy/dkim_sign.py), above our Received:.
_OUR_SIGNATURES = re.compile(rb"\A(?:dkim-signature[ \t]*:.*\n(?:[ \t].*\n)*)+", re.IGNORECASE)


TLS_STATUS = "4.7.5"  # RFC 3463 X.7.5 cryptographic failure: the TLS policy was not met
REQUIRETLS_STATUS = "5.7.10"  # RFC 8689 §6: REQUIRETLS support required


@dataclass(frozen=True, slots=True)
class Hop:
    host: str  # MX host name, or an IP address (literal, smarthost)
    port: int
    dnssec: bool = False  # found through a DNSSEC-authenticated MX RRset (DANE may apply)


class RouteError(Exception):
    def __init__(self, text: str, status: str) -> None:
        super().__init__(text)
        self.text = text
        self.status = status

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5")


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _literal_ip(domain: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` -> the address (RFC 5321 §4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    return _ip(inner[5:] if inner[:5].lower() == "ipv6:" else inner)


def _label(host: str, ip: str, port: int) -> str:
    return f"{host}[{ip}]:{port}"


class _Attempt:
    """What went wrong so far, across hosts, for the final verdict."""

    def __init__(self) -> None:
        self.text = ""
        self.status = "4.4.1"
        self.remote = ""
        self.smtp_reply = False
        self.only_permanent = True  # every host so far refused with 5xx
        self.refused_here = False  # we refused a host for good (REQUIRETLS, RFC 8689 §4.2.1)
        self.tried = 0

    def failed(
        self,
        text: str,
        status: str,
        remote: str,
        *,
        reply: Reply | None = None,
        permanent: bool = False,
    ) -> None:
        self.tried += 1
        # A refusal keeps the peer's own words (the DSN's Diagnostic-Code).
        self.text = reply.summary if reply is not None else text
        self.status, self.remote = status, remote
        self.smtp_reply = reply is not None
        self.refused_here = self.refused_here or permanent
        if (reply is None and not permanent) or (reply is not None and not reply.is_permanent):
            self.only_permanent = False


class RemoteCourier:
    def __init__(
        self,
        relay: RelaySettings,
        hostname: str,
        resolver: Resolver,
        *,
        tls: ssl.SSLContext | None = None,
        timeouts: ClientTimeouts | None = None,
        rng: random.Random | None = None,
        cache: ConnectionCache | None = None,
        signer: DkimSigner | None = None,
        policies: TlsPolicies | None = None,
        tls_reports: TlsReportRecorder | None = None,
    ) -> None:
        """``signer``: signs our own mail again after an 8-bit conversion;
        ``policies``: MTA-STS (without it: ``[relay] tls`` alone);
        ``tls_reports``: records each new connection's TLS outcome (RFC 8460)."""
        self._policies = policies
        self._relay = relay
        self._tls_reports = tls_reports
        self._signer = signer
        self._hostname = hostname
        self._resolver = resolver
        self._tls = tls if tls is not None else client_tls_context()
        self._timeouts = timeouts or ClientTimeouts(connect=relay.connect_timeout)
        self._rng = rng or random.SystemRandom()
        self._cache = (
            cache if cache is not None else ConnectionCache(max_parked=max(1, relay.max_deliveries))
        )

    def reconfigure(self, relay: RelaySettings) -> None:
        """New relay settings (a reload): the next route and connection use them."""
        self._relay = relay
        self._timeouts = dataclasses.replace(self._timeouts, connect=relay.connect_timeout)
        if self._policies is not None:
            self._policies.reconfigure(relay)

    async def close(self) -> None:
        """Close parked connections (at shutdown)."""
        await self._cache.close()
        if self._tls_reports is not None:
            await asyncio.to_thread(self._tls_reports.close)

    def destination(self, domain: str) -> str:
        """The key that concurrency limits apply to."""
        return str(self._relay.smarthost) if self._relay.smarthost else domain

    async def route(self, domain: str) -> tuple[list[Hop], bool]:
        """The hops to try and whether the domain is its own implicit MX."""
        relay = self._relay
        if relay.smarthost is not None:
            return [Hop(relay.smarthost.host, relay.smarthost.port)], False
        literal = _literal_ip(domain)
        if literal is not None:
            return [Hop(literal, relay.mx_port)], False
        if domain.startswith("["):
            raise RouteError(f"bad address literal {domain}", "5.1.2")
        try:
            records, secure = await self._resolver.mx_dnssec(domain)
        except DnsError as exc:
            if exc.temporary:
                raise RouteError(f"MX lookup for {domain} failed: {exc}", "4.4.3") from None
            raise RouteError(f"domain {domain} does not exist", "5.1.2") from None
        try:
            hosts = order_mx(records, self._rng, self_names=[self._hostname])
        except NullMx:
            # RFC 7505 §4.2: a null MX means the domain takes no mail; bounce at once.
            raise RouteError(f"domain {domain} accepts no mail (null MX)", "5.1.10") from None
        except MxLoopsToSelf:
            raise RouteError(f"mail for {domain} loops back to myself", "5.4.6") from None
        if not hosts:
            # RFC 7672 §2.2.1: an authenticated denial of MX makes the domain
            # itself the (secure) host.
            return [Hop(domain, relay.mx_port, secure)], True
        return [Hop(h, relay.mx_port, secure) for h in hosts], False

    async def deliver(
        self,
        domain: str,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
    ) -> list[RecipientResult]:
        """Deliver to ``recipients`` (all in ``domain``); one result each.

        RFC 5321 §4.5.3.1.8: a server need not take more than 100 recipients
        per transaction, so longer lists go in several transactions (over one
        connection, thanks to the cache)."""
        results: list[RecipientResult] = []
        for start in range(0, len(recipients), RCPTS_PER_TRANSACTION):
            chunk = recipients[start : start + RCPTS_PER_TRANSACTION]
            results += await self._deliver_chunk(domain, sender, chunk, message)
        return results

    async def _deliver_chunk(
        self,
        domain: str,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
    ) -> list[RecipientResult]:
        requiretls = message.dsn.requiretls
        destination = self.destination(domain)
        policy: TlsPolicy | None = None
        # A parked connection may not be verified TLS: never for REQUIRETLS,
        # and otherwise only when it has what this domain's policy asks now.
        if not requiretls and self._cache.has(destination):
            policy = await self._domain_policy(domain)
            wanted = (
                decide("opportunistic", domain, StsLookup(None))
                if message.traits.tls_optional
                else policy
            )
            cached = await self._deliver_cached(destination, sender, recipients, message, wanted)
            if cached is not None:
                return cached
        try:
            hops, implicit = await self.route(domain)
        except RouteError as err:
            outcome = Outcome.FAILED if err.permanent else Outcome.DEFERRED
            return [RecipientResult(r, outcome, err.text, err.status) for r in recipients]
        if policy is None:
            policy = await self._domain_policy(domain)
        if requiretls:
            policy = policy.strict()  # RFC 8689 §4.2.1: MTA-STS testing counts as enforce
        elif message.traits.tls_optional:
            # RFC 8689 §5: "TLS-Required: No": the sender prefers delivery to
            # the recipient's TLS policy; TLS is still used when offered.
            policy = decide("opportunistic", domain, StsLookup(None))
        attempt = _Attempt()
        dns_trouble = False
        for hop in hops:
            ip = _ip(hop.host)
            if ip is not None:
                addresses = [ip]
            else:
                try:
                    addresses = await self._resolver.addresses(hop.host)
                except DnsError as exc:
                    dns_trouble = True
                    attempt.failed(f"address lookup for {hop.host} failed: {exc}", "4.4.3", "")
                    continue
            if not addresses:
                attempt.failed(f"no address for MX host {hop.host}", "4.4.4", "")
                continue
            optional = message.traits.tls_optional and not requiretls
            try:
                dane_policy = (
                    await dane.lookup(self._resolver, hop.host, hop.port)
                    if hop.dnssec and not optional
                    else None
                )
            except DnsError as exc:
                # RFC 7672 §2.2.2: a TLSA lookup that fails makes the host unusable.
                dns_trouble = True
                attempt.failed(f"TLSA lookup for {hop.host} failed: {exc}", "4.7.5", "")
                continue
            hop_policy = self._hop_policy(policy, hop, dane_policy, attempt, requiretls)
            if hop_policy is None:
                continue
            for address in addresses:
                results = await self._try_address(
                    hop, address, sender, recipients, message, attempt, hop_policy
                )
                if results is not None:
                    return results
        if implicit and attempt.tried == 1 and not dns_trouble and attempt.status == "4.4.4":
            # RFC 5321 §5.1: no MX and no address records: the domain takes no mail.
            text = f"domain {domain} has no MX and no address records"
            return [RecipientResult(r, Outcome.FAILED, text, "5.1.2") for r in recipients]
        if attempt.only_permanent and (attempt.smtp_reply or attempt.refused_here):
            outcome = Outcome.FAILED
        else:
            outcome = Outcome.DEFERRED
            if not attempt.status.startswith("4"):
                attempt.status = "4" + attempt.status[1:]
        return [
            RecipientResult(
                r, outcome, attempt.text, attempt.status, attempt.remote, attempt.smtp_reply
            )
            for r in recipients
        ]

    async def _domain_policy(self, domain: str) -> TlsPolicy:
        """MTA-STS and ``[relay] tls`` for ``domain``; a smarthost or an
        address literal has no MTA-STS policy of its own."""
        if self._policies is None or self._relay.smarthost is not None or domain.startswith("["):
            return decide(self._relay.tls, domain, StsLookup(None))
        return await self._policies.for_domain(domain)

    def _hop_policy(
        self,
        policy: TlsPolicy,
        hop: Hop,
        dane_policy: dane.DanePolicy | None,
        attempt: _Attempt,
        requiretls: bool,
    ) -> TlsPolicy | None:
        """The policy for one MX host (DANE's if it has one: it wins), or
        None when the host may not be used at all."""
        if dane_policy is not None:
            policy = decide(self._relay.tls, policy.policy_domain, StsLookup(None), dane_policy)
            if requiretls:
                policy = policy.strict()
        if policy.failure:  # a policy promised (TXT) but not had: TLS reports count it
            self._record(policy, hop, policy.failure)
        if not policy.allows_mx(hop.host):
            # RFC 8461 §4.1: an MX the policy does not list is not a valid host.
            text = f"MX host {hop.host} is not in the MTA-STS policy of {policy.policy_domain}"
            self._record(policy, hop, VALIDATION_FAILURE, reason=text)
            if policy.enforce:
                attempt.failed(text, TLS_STATUS, "")
                return None
        if policy.kind == DANE_ONLY:
            attempt.failed(f"no usable DANE policy for {hop.host} ([relay] tls)", TLS_STATUS, "")
            return None
        if requiretls and not policy.verified:
            # RFC 8689 §4.2.1: REQUIRETLS needs a verified peer (MTA-STS or DANE).
            text = f"REQUIRETLS: no MTA-STS or DANE policy verifies {hop.host}"
            attempt.failed(text, REQUIRETLS_STATUS, "", permanent=True)
            return None
        return policy

    def _record(
        self,
        policy: TlsPolicy,
        hop: Hop,
        result: str,
        client: SmtpClient | None = None,
        reason: str = "",
    ) -> None:
        """Record a connection's TLS outcome for TLS reports (RFC 8460 §4.3
        result type; "" a success) under the policy it was held to (§4.4:
        "sts" with the policy's lines, "tlsa" with the records, else
        "no-policy-found"); an MTA-STS testing failure is logged too."""
        if policy.testing and result:
            log.warning(
                "MTA-STS testing: %s for %s would have failed (%s); delivering anyway",
                hop.host,
                policy.policy_domain,
                result,
            )
        if self._tls_reports is None:
            return
        failure = None
        if result:
            mx = hop.host if _ip(hop.host) is None else ""
            local, peer = (client.local_ip, client.peer_ip) if client is not None else ("", "")
            failure = TlsFailure(result, local, mx, peer, reason)
        self._tls_reports.record(policy.report_policy(), failure)

    async def _contexts(self, policy: TlsPolicy) -> list[ssl.SSLContext | None]:
        """The TLS tried on one address, in order (None: plaintext)."""
        opportunistic = self._tls
        if policy.dane is not None:  # DANE: its own check after the handshake (RFC 7672 §3)
            return [opportunistic]
        if not policy.verify:
            return [opportunistic, None]
        verifying = (
            await self._policies.verifying()
            if self._policies is not None
            else await asyncio.to_thread(verifying_context, self._relay.ca_file)
        )
        if policy.enforce:
            return [verifying]
        return [verifying, opportunistic, None]  # MTA-STS testing: report, then deliver

    async def _try_address(
        self,
        hop: Hop,
        ip: str,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
        attempt: _Attempt,
        policy: TlsPolicy,
    ) -> list[RecipientResult] | None:
        """Results if this address gave a definite answer, else None (try the next)."""
        label = _label(hop.host, ip, hop.port)
        contexts = await self._contexts(policy)
        for i, tls in enumerate(contexts):  # the next pass only after a failed TLS handshake
            try:
                return await self._session(
                    hop, ip, label, sender, recipients, message, attempt, tls, policy, i == 0
                )
            except _TlsFailed as exc:
                if i + 1 < len(contexts):
                    log.info("%s: %s; retrying with %s", label, exc, _pass_name(contexts[i + 1]))
                    continue
                text = f"{label}: {exc}"
                if policy.enforce:
                    text += f" (TLS required by the {policy.kind} policy)"
                attempt.failed(text, TLS_STATUS if policy.enforce else "4.4.2", label)
        return None

    async def _session(
        self,
        hop: Hop,
        ip: str,
        label: str,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
        attempt: _Attempt,
        tls: ssl.SSLContext | None,
        policy: TlsPolicy,
        report: bool = True,
    ) -> list[RecipientResult] | None:
        try:
            client = await SmtpClient.connect(ip, hop.port, self._timeouts)
        except SmtpConnectionError as exc:
            attempt.failed(f"connect to {label}: {exc}", "4.4.1", label)
            log.debug("connect to %s failed: %s", label, exc)
            return None
        parked = False
        try:
            if not await self._open(client, hop, label, attempt, tls, policy, report):
                return None
            link = Parked(client, hop.host, label, policy.kind)
            results, parked = await self._transact(
                link, sender, recipients, message, attempt, verified=policy.verified and client.tls
            )
            return results
        except SmtpConnectionError as exc:
            return self._lost(client, label, exc, recipients, attempt)
        except asyncio.CancelledError:
            client.abort()  # shutting down: no polite QUIT to wait for
            raise
        finally:
            if not parked:
                await client.quit()

    async def _deliver_cached(
        self,
        destination: str,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
        policy: TlsPolicy,
    ) -> list[RecipientResult] | None:
        """Use a parked connection to ``destination``, if one is still good
        and its TLS meets ``policy`` (which may have changed since it was
        parked: a reload, a new MTA-STS policy)."""
        for _ in range(MAX_PARKED_TRIES):
            link = self._cache.take(destination)
            if link is None:
                return None
            if not policy.reusable(link.host, link.tls_kind, link.client.verified):
                log.debug(
                    "%s: parked connection falls short of the %s policy", link.label, policy.kind
                )
                self._cache.discard(link)
                return None
            link.uses += 1
            before = link.client.replies_read
            attempt = _Attempt()
            parked = False
            try:
                results, parked = await self._transact(
                    link, sender, recipients, message, attempt, reused=True
                )
            except SmtpConnectionError as exc:
                if link.client.replies_read == before:
                    continue  # the peer closed it while it was parked: not a failure
                return self._lost(link.client, link.label, exc, recipients, attempt)
            finally:
                if not parked:
                    await link.client.quit()
            if results is not None:
                return results
        return None

    def _lost(
        self,
        client: SmtpClient,
        label: str,
        exc: SmtpConnectionError,
        recipients: Sequence[Address],
        attempt: _Attempt,
    ) -> list[RecipientResult] | None:
        client.abort()
        text = f"{label}: {exc}"
        if exc.after_data:
            # The peer may have the message (RFC 5321 §6.1); trying another
            # host now would make a duplicate likelier.  Retry later.
            return [RecipientResult(r, Outcome.DEFERRED, text, "4.4.2", label) for r in recipients]
        attempt.failed(text, "4.4.2", label)
        return None

    async def _open(
        self,
        client: SmtpClient,
        hop: Hop,
        label: str,
        attempt: _Attempt,
        tls: ssl.SSLContext | None,
        policy: TlsPolicy,
        report: bool = True,
    ) -> bool:
        """Greeting, EHLO and STARTTLS as ``tls`` and the policy say (checked
        under DANE); False if the host refused or the policy's TLS cannot be
        had.  ``report``: record the outcome for TLS reports (the first try
        of an address only, so a fallback is not counted twice)."""
        greeting = await client.greeting()
        if not greeting.is_positive:
            attempt.failed(
                f"{label} greeted: {greeting.summary}", status_of(greeting), label, reply=greeting
            )
            return False
        hello = await client.hello(self._hostname)
        offered = hello.is_positive and "STARTTLS" in client.extensions
        if tls is not None and hello.is_positive and not offered:
            if report:
                self._record(policy, hop, STARTTLS_NOT_SUPPORTED, client)
            if policy.enforce:
                # RFC 8461 §5, RFC 7672 §2.2, tls = "verify": no TLS, no delivery.
                if policy.requiretls:  # RFC 8689 §4.2.1: no TLS at all: return the message
                    text = f"{label} offers no STARTTLS, which REQUIRETLS needs"
                    attempt.failed(text, REQUIRETLS_STATUS, label, permanent=True)
                    return False
                text = f"{label} offers no STARTTLS, which the {policy.kind} policy requires"
                attempt.failed(text, TLS_STATUS, label)
                return False
        if tls is not None and offered:
            # Verified: the certificate must name the MX host (RFC 8461 §4.2).
            verified = tls is not self._tls
            name = hop.host if verified or _ip(hop.host) is None else None
            try:
                reply = await client.starttls(tls, name)
            except SmtpConnectionError as exc:
                result = failure_type(exc.tls_error)
                if report:
                    self._record(policy, hop, result, client, str(exc))
                raise _TlsFailed(str(exc), result) from None
            if reply.code == 220:
                if policy.dane is not None and not await self._dane_check(
                    client, policy.dane, label, attempt
                ):
                    if report:
                        self._record(policy, hop, TLSA_INVALID, client)
                    return False
                if verified:
                    client.verified = f"{policy.kind} policy ({name})"
                if report:
                    self._record(policy, hop, "", client)
                hello = await client.hello(self._hostname)  # RFC 3207 §4.2: start over
            elif policy.enforce:
                if report:
                    self._record(policy, hop, STARTTLS_NOT_SUPPORTED, client)
                attempt.failed(f"{label} refused STARTTLS: {reply.summary}", TLS_STATUS, label)
                return False
        if not hello.is_positive:
            attempt.failed(
                f"{label} refused EHLO: {hello.summary}", status_of(hello), label, reply=hello
            )
            return False
        return True

    async def _dane_check(
        self, client: SmtpClient, policy: dane.DanePolicy, label: str, attempt: _Attempt
    ) -> bool:
        """Right after the handshake and before anything else is said: does
        the certificate match the TLSA records (RFC 7672 §3)?"""
        now = datetime.datetime.now(datetime.UTC)
        verdict = await asyncio.to_thread(policy.check, client.peer_chain(), now)
        if not verdict.ok:
            log.warning("%s: DANE verification failed: %s", label, verdict.detail)
            attempt.failed(f"{label}: DANE verification failed: {verdict.detail}", "4.7.5", label)
            return False
        client.verified = f"DANE ({verdict.detail})" if policy.records else ""
        log.info("%s: DANE: %s", label, verdict.detail)
        return True

    async def _transact(
        self,
        link: Parked,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
        attempt: _Attempt,
        *,
        reused: bool = False,
        verified: bool = False,
    ) -> tuple[list[RecipientResult] | None, bool]:
        """One transaction on an open connection: (results or None to try the
        next host, whether the connection was parked for reuse)."""
        client, label = link.client, link.label
        destination = self.destination(recipients[0].domain)
        requiretls = message.dsn.requiretls
        if requiretls and not (verified and "REQUIRETLS" in client.extensions):
            # RFC 8689 §4.2.1: only over verified TLS to a host offering REQUIRETLS.
            text = f"{label} does not support REQUIRETLS over verified TLS"
            attempt.failed(text, REQUIRETLS_STATUS, label, permanent=True)
            return None, False
        refusal = self._capability_problem(client, sender, recipients, message, label)
        if refusal is not None:
            return refusal, self._cache.park(destination, link)
        traits = message.traits
        body = message.chunks()
        if traits.body_8bit and "8BITMIME" not in client.extensions:
            converted = await self._seven_bit(message, recipients, label)
            if isinstance(converted, list):
                return converted, self._cache.park(destination, link)
            body, traits = _blocks(converted), _traits(converted)
        result = await client.send(
            sender,
            recipients,
            body,
            size=traits.crlf_size if "SIZE" in client.extensions else None,
            body_8bit=traits.body_8bit and "8BITMIME" in client.extensions,
            smtputf8=self._needs_smtputf8(sender, recipients, message),
            dsn=message.dsn,
            rcpt_dsn={r: message.recipient_dsn(r) for r in recipients},
            requiretls=requiretls,
        )
        peer_dsn = "DSN" in client.extensions  # the parameters went with it (RFC 3461 §5.2)
        first = result.mail
        if first.is_transient:
            if reused and first.code == 421:
                raise SmtpConnectionError("parked connection closed by the peer")
            # MAIL refused for now: a problem of this host (busy, out of
            # space), not of the recipients, so try the next MX (RFC 5321 §5.1).
            attempt.failed(f"{label} said: {first.summary}", status_of(first), label, reply=first)
            return None, False
        suffix = f" (TLS {client.tls_info()})" if client.tls else ""
        results = [
            RecipientResult(
                r,
                outcome_of(reply),
                reply.summary + (suffix if reply.is_positive else ""),
                status_of(reply),
                label,
                smtp_reply=True,
                peer_dsn=peer_dsn,
            )
            for r, reply in result.replies.items()
        ]
        # Only a completed DATA leaves the session in a known, reset state.
        # A connection opened for one message's own TLS rules (REQUIRETLS's, or
        # none at all for "TLS-Required: No") is not parked for the next message.
        park = result.data_sent and not requiretls and not message.traits.tls_optional
        return results, park and self._cache.park(destination, link)

    async def _seven_bit(
        self, message: MessageSource, recipients: Sequence[Address], label: str
    ) -> bytes | list[RecipientResult]:
        """The message converted for a peer without 8BITMIME (RFC 6152 §3),
        or why it cannot be (5.6.3, as before conversion existed).  Held
        whole: the size limit bounds it, and this is the rare path."""
        data = b"".join([chunk async for chunk in message.chunks()])
        try:
            converted = await asyncio.to_thread(self._convert, data)
        except DowngradeError as exc:
            text = f"{label} does not support 8BITMIME, and the message cannot be converted: {exc}"
            return [RecipientResult(r, Outcome.FAILED, text, "5.6.3", label) for r in recipients]
        log.info("delivery to %s: 8-bit content converted to 7-bit (no 8BITMIME)", label)
        return converted

    def _convert(self, data: bytes) -> bytes:
        """``to_7bit``, then our own DKIM signatures made again over the new
        body (a foreign signature breaks: nothing can mend it)."""
        converted = to_7bit(data)
        ours = _OUR_SIGNATURES.match(converted)
        if ours is None or self._signer is None:
            return converted
        unsigned = converted[ours.end() :]
        return self._signer.sign_blocking(unsigned) + unsigned

    def _needs_smtputf8(
        self, sender: Address | None, recipients: Sequence[Address], message: MessageSource
    ) -> bool:
        addresses = [*recipients, *([sender] if sender else [])]
        return message.traits.header_8bit or any(not str(a).isascii() for a in addresses)

    def _capability_problem(
        self,
        client: SmtpClient,
        sender: Address | None,
        recipients: Sequence[Address],
        message: MessageSource,
        label: str,
    ) -> list[RecipientResult] | None:
        """Permanent failures for a message this peer cannot take as it is."""
        ext = client.extensions
        traits = message.traits
        problem: tuple[str, str] | None = None
        if self._needs_smtputf8(sender, recipients, message) and "SMTPUTF8" not in ext:
            # RFC 6531 §3.2: no SMTPUTF8 at the server means the message
            # cannot be sent there; we do not downgrade.
            problem = ("5.6.7", f"{label} does not support SMTPUTF8, which this message needs")
        elif "SIZE" in ext and ext["SIZE"].isdigit() and int(ext["SIZE"]) > 0:
            limit = int(ext["SIZE"])
            if traits.crlf_size > limit:  # RFC 1870 §6.1
                problem = (
                    "5.3.4",
                    f"message size {traits.crlf_size} exceeds {label}'s limit {limit}",
                )
        if problem is None:
            return None
        status, text = problem
        return [RecipientResult(r, Outcome.FAILED, text, status, label) for r in recipients]


def _traits(message: bytes) -> MessageTraits:
    scanner = TraitScanner()
    scanner.feed(message)
    return scanner.traits()


async def _blocks(message: bytes) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(message), SEND_BLOCK):
        yield message[start : start + SEND_BLOCK]


class _TlsFailed(Exception):
    def __init__(self, text: str, result: str) -> None:
        super().__init__(text)
        self.result = result  # RFC 8460 §4.3 result type


def _pass_name(tls: ssl.SSLContext | None) -> str:
    if tls is None:
        return "no TLS"
    return "verified TLS" if tls.verify_mode == ssl.CERT_REQUIRED else "unverified TLS"
