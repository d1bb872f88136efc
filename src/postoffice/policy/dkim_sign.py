"""DKIM signing of submitted mail on its way into the outbound queue.

The SMTP session wraps the queue writer of an authenticated submission in
``DkimSigner.wrap``: the message (already with our Received:, Date: and
Message-ID:) is collected, signed in a worker thread, and written to the
queue with its DKIM-Signature fields on top.  Each message is signed once,
here; the queue and the couriers send it as stored.  What is signed is the
form that goes on the wire: lines over 998 octets folded (mail/folding.py),
which the queue does before it calls the signer.  Mail that arrives on
the ``smtp`` listener is never signed, even when an alias sends it on:
signing it would vouch for content we did not check.

The signing domain (d=) is the From: domain, or the nearest parent domain
up to its organizational domain that has keys (still DMARC-aligned in
relaxed mode, RFC 7489 §3.1.1).  Signatures use relaxed/relaxed
canonicalisation (RFC 6376 §3.4) and cover dkimpy's recommended header set
(RFC 6376 §5.4.1) plus List-Unsubscribe-Post (RFC 8058 §4), with From:
signed once more than it occurs, so no From: can be added later (§8.15).
A message whose domain has no keys goes out unsigned; keys that exist but
cannot be used are logged as errors and the message still goes out.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, Protocol

import dkim

from postoffice.mail.folding import fold_lines
from postoffice.mail.headers import header_block
from postoffice.policy.dkim_keys import RSA, DkimKeyError, KeyStore, SigningKey
from postoffice.policy.dmarc import authors, organizational_domain

log = logging.getLogger("postoffice.dkim")

EXTRA_SIGNED = (b"list-unsubscribe-post",)


class MessageWriter(Protocol):
    async def write(self, data: bytes) -> None: ...
    async def commit(self) -> Any: ...
    async def discard(self) -> None: ...


def _candidates(domain: str) -> list[str]:
    """``domain`` and its parents down to its organizational domain."""
    org = organizational_domain(domain)
    names = [domain]
    while names[-1] != org and "." in names[-1]:
        names.append(names[-1].split(".", 1)[1])
    return names


class DkimSigner:
    def __init__(self, keys: KeyStore, executor: Executor) -> None:
        self._keys = keys
        self._executor = executor
        self._logger = logging.getLogger("postoffice.dkim.dkimpy")

    def _keys_for(self, message: bytes) -> tuple[str, list[SigningKey]]:
        for author in authors(header_block(message)).domains:
            for domain in _candidates(author):
                keys = self._keys.keys_for(domain)
                if keys:
                    return domain, keys
        return "", []

    def sign_blocking(self, message: bytes) -> bytes:
        """The DKIM-Signature fields (LF line ends) to put on top of
        ``message`` (LF form); b"" when no key applies.  Blocking and
        CPU-bound: run it in a worker thread."""
        try:
            domain, keys = self._keys_for(message)
        except DkimKeyError as exc:
            log.error("dkim: cannot load keys, sending unsigned: %s", exc)
            return b""
        out = []
        for key in keys:
            signer = dkim.DKIM(message, logger=self._logger, linesep=b"\n")
            signer.should_sign.update(EXTRA_SIGNED)
            algorithm = b"rsa-sha256" if key.key.algorithm == RSA else b"ed25519-sha256"
            try:
                header = signer.sign(
                    key.key.selector.encode("ascii"),
                    domain.encode("ascii"),
                    key.private,
                    signature_algorithm=algorithm,
                    canonicalize=(b"relaxed", b"relaxed"),
                )
            except dkim.DKIMException as exc:
                log.error("dkim: signing as %s failed: %s", key.key.dns_name, exc)
                continue
            out.append(header if header.endswith(b"\n") else header + b"\n")
        return b"".join(out)

    async def sign(self, message: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.sign_blocking, message)

    def wrap(self, writer: MessageWriter) -> SigningWriter:
        return SigningWriter(writer, self)


class SigningWriter:
    """A queue writer that signs: holds the message, then writes the signed
    message to ``inner`` at commit (through ``inner.commit_with_head`` when it
    has one, so signing and storing share a worker thread).  The SMTP size
    limit bounds what is held."""

    def __init__(self, inner: MessageWriter, signer: DkimSigner) -> None:
        self._inner = inner
        self._signer = signer
        self._held = bytearray()

    def __getattr__(self, name: str) -> Any:  # queue_id and the like
        return getattr(self._inner, name)

    async def write(self, data: bytes) -> None:
        self._held += data

    async def commit(self) -> Any:
        message = bytes(self._held)
        self._held.clear()
        commit_with_head = getattr(self._inner, "commit_with_head", None)
        if commit_with_head is not None:
            # The queue folds long lines and signs in the thread that stores
            # the message: one trip, and the signature covers the folded form.
            return await commit_with_head(message, self._signer.sign_blocking)
        message = fold_lines(message)  # sign what will be sent
        signatures = await self._signer.sign(message)
        if signatures:
            await self._inner.write(signatures)
        await self._inner.write(message)
        return await self._inner.commit()

    async def discard(self) -> None:
        self._held.clear()
        await self._inner.discard()
