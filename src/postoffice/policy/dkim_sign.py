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

import logging

import dkim

from postoffice.mail.headers import header_block
from postoffice.policy.dkim_keys import RSA, DkimKeyError, SigningKey, SigningKeys
from postoffice.policy.dmarc import authors, organizational_domain
from postoffice.storage.sink import HeadedSink

log = logging.getLogger("postoffice.dkim")

EXTRA_SIGNED = (b"list-unsubscribe-post",)


def _candidates(domain: str) -> list[str]:
    """``domain`` and its parents down to its organizational domain."""
    org = organizational_domain(domain)
    names = [domain]
    while names[-1] != org and "." in names[-1]:
        names.append(names[-1].split(".", 1)[1])
    return names


class DkimSigner:
    def __init__(self, keys: SigningKeys) -> None:
        self._keys = keys
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

    def wrap(self, writer: HeadedSink) -> SigningWriter:
        return SigningWriter(writer, self)


class SigningWriter:
    """A sink into the queue that signs (a ``MessageSink``, storage/sink.py):
    holds the message, then hands it to ``inner.commit_with_head`` at
    commit, so the queue folds long lines and signs in the thread that
    stores it: one trip, and the signature covers the folded form.  The SMTP
    size limit bounds what is held."""

    def __init__(self, inner: HeadedSink, signer: DkimSigner) -> None:
        self._inner = inner
        self._signer = signer
        self._held = bytearray()

    async def write(self, data: bytes, newlines: int = -1) -> None:
        self._held += data

    async def commit(self) -> str:
        """The queue id, once the signed message is durable."""
        message = bytes(self._held)
        self._held.clear()
        return await self._inner.commit_with_head(message, self._signer.sign_blocking)

    async def discard(self) -> None:
        self._held.clear()
        await self._inner.discard()
