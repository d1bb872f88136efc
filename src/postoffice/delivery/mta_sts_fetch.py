"""MTA-STS policy discovery (RFC 8461 §3, §5.1): TXT lookup, HTTPS fetch, disk cache.

The TXT record ``_mta-sts.<domain>`` is looked up through the one resolver
(``[relay] dns_servers``); when its id differs from the cached policy's, or
nothing unexpired is cached, the policy is fetched from
``https://mta-sts.<domain>/.well-known/mta-sts.txt``: the host's addresses
through the same resolver, a certificate verified for that name against
the system store plus ``[relay] ca_file`` (§3.3), no redirects (§3.3), a
size cap and a time cap.  The parsed policy is cached on disk under
``data_dir/mta-sts/`` with its id and expiry (atomic writes), so it
survives restarts: §5.1 says a cached, unexpired policy stays in force when
the TXT record vanishes or the fetch fails, which is what keeps an attacker
who blocks the fetch from downgrading us.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h11

from postoffice.delivery.mta_sts import StsPolicy, StsPolicyError, parse_policy, parse_txt
from postoffice.dns.resolver import DnsError, Resolver
from postoffice.storage.safeio import atomic_write

log = logging.getLogger("postoffice.delivery")

MAX_POLICY_SIZE = 64 * 1024  # §3.3 suggests a cap; 64 KiB is far beyond any real policy
FETCH_TIMEOUT = 30.0  # seconds for the whole fetch (§3.3: senders SHOULD set a timeout)
WELL_KNOWN = "/.well-known/mta-sts.txt"
# RFC 8460 §4.3 result types for a policy we could not have.
FETCH_ERROR, POLICY_INVALID = "sts-policy-fetch-error", "sts-policy-invalid"


class FetchError(Exception):
    def __init__(self, text: str, result: str = FETCH_ERROR) -> None:
        super().__init__(text)
        self.result = result


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    policy_id: str
    expires: float  # time.time() after which it no longer applies
    policy: StsPolicy


@dataclass(frozen=True, slots=True)
class StsLookup:
    """What discovery found: the policy in force (or None), and why not if a
    TXT record promised one that could not be had (a TLS-RPT result type)."""

    policy: StsPolicy | None
    failure: str = ""


class StsPolicySource:
    """Finds the MTA-STS policy of a destination domain; one per delivering process."""

    def __init__(
        self,
        cache_dir: Path,
        resolver: Resolver,
        *,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dir = cache_dir
        self._resolver = resolver
        self._port = port
        self._timeout = timeout
        self._clock = clock
        self._memory: dict[str, CachedPolicy] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def reconfigure(self, port: int) -> None:
        self._port = port

    async def lookup(self, domain: str, context: ssl.SSLContext) -> StsLookup:
        domain = domain.lower().removesuffix(".")
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one fetch per domain at a time
            return await self._lookup(domain, context)

    async def _lookup(self, domain: str, context: ssl.SSLContext) -> StsLookup:
        cached = await self._cached(domain)
        now = self._clock()
        live = cached if cached is not None and cached.expires > now else None
        try:
            policy_id = parse_txt(await self._resolver.txt(f"_mta-sts.{domain}"))
        except DnsError as exc:
            if not exc.temporary:
                policy_id = None
            else:
                log.info("MTA-STS: TXT lookup for %s failed: %s", domain, exc)
                return StsLookup(live.policy if live else None)
        if policy_id is None:
            # §5.1: no valid TXT record, but a cached policy: keep it until it expires.
            return StsLookup(live.policy if live else None)
        if live is not None and live.policy_id == policy_id:
            return StsLookup(live.policy)
        try:
            body = await self._fetch(domain, context)
            policy = parse_policy(body)
        except FetchError as exc:
            return self._failed(domain, live, str(exc), exc.result)
        except StsPolicyError as exc:
            return self._failed(domain, live, str(exc), POLICY_INVALID)
        fresh = CachedPolicy(policy_id, now + policy.max_age, policy)
        self._memory[domain] = fresh
        await asyncio.to_thread(self._store, domain, fresh)
        log.info("MTA-STS: policy %s for %s: mode %s", policy_id, domain, policy.mode)
        return StsLookup(policy)

    def _failed(self, domain: str, live: CachedPolicy | None, text: str, result: str) -> StsLookup:
        if live is not None:
            log.warning("MTA-STS: fetch for %s failed (%s); cached policy kept", domain, text)
            return StsLookup(live.policy, result)
        log.warning("MTA-STS: policy fetch for %s failed: %s", domain, text)
        return StsLookup(None, result)

    # --- the disk cache ---------------------------------------------------------------
    def _path(self, domain: str) -> Path:
        return self._dir / f"{domain}.json"  # a domain is LDH labels: a safe file name

    async def _cached(self, domain: str) -> CachedPolicy | None:
        if domain not in self._memory:
            found = await asyncio.to_thread(self._load, domain)
            if found is not None:
                self._memory[domain] = found
        return self._memory.get(domain)

    def _load(self, domain: str) -> CachedPolicy | None:
        try:
            raw = json.loads(self._path(domain).read_text("utf-8"))
            policy = parse_policy("\n".join(raw["policy"]).encode("ascii"))
            return CachedPolicy(str(raw["id"]), float(raw["expires"]), policy)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, StsPolicyError) as exc:
            log.warning("MTA-STS: cached policy for %s unreadable (%s); ignored", domain, exc)
            return None

    def _store(self, domain: str, entry: CachedPolicy) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        raw = {"id": entry.policy_id, "expires": entry.expires, "policy": list(entry.policy.text)}
        atomic_write(self._path(domain), json.dumps(raw).encode("utf-8"), 0o600)

    # --- the fetch --------------------------------------------------------------------
    async def _fetch(self, domain: str, context: ssl.SSLContext) -> bytes:
        host = f"mta-sts.{domain}"
        try:
            addresses = await self._resolver.addresses(host)
        except DnsError as exc:
            raise FetchError(f"address lookup for {host} failed: {exc}") from None
        if not addresses:
            raise FetchError(f"{host} has no address")
        problem = ""
        for ip in addresses:
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._get(ip, host, context)
            except TimeoutError:
                problem = f"{host}[{ip}]: timed out"
            except ssl.SSLCertVerificationError as exc:
                problem = f"{host}[{ip}]: certificate: {exc.verify_message}"
            except (OSError, h11.ProtocolError) as exc:
                problem = f"{host}[{ip}]: {exc}"
        raise FetchError(problem)

    async def _get(self, ip: str, host: str, context: ssl.SSLContext) -> bytes:
        reader, writer = await asyncio.open_connection(
            ip, self._port, ssl=context, server_hostname=host
        )
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=WELL_KNOWN,
                headers=[("Host", host), ("User-Agent", "postoffice"), ("Connection", "close")],
            )
            writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
            await writer.drain()
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(16384))
                elif isinstance(event, h11.Response):
                    # §3.3: 200 only; redirects MUST NOT be followed.
                    if event.status_code != 200:
                        raise FetchError(f"{host} answered HTTP {event.status_code}")
                    kind = dict(event.headers).get(b"content-type", b"").split(b";")[0]
                    if kind.strip().lower() != b"text/plain":  # §3.2: the media type
                        raise FetchError(f"{host} served {kind!r}, not text/plain", POLICY_INVALID)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_POLICY_SIZE:
                        raise FetchError(f"{host}: policy larger than {MAX_POLICY_SIZE} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise FetchError(f"{host} closed the connection early")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(2):
                    await writer.wait_closed()
