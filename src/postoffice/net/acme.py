"""ACME (RFC 8555): the server's certificate from a CA, through certbot's ``acme``.

Everything here blocks (HTTP to the CA, key generation, file writes):
net/acme_renewal.py runs it in a worker thread.  What lives on disk, in
``data_dir/acme`` (mode 0700):

- ``account.key``: the ACME account's EC P-256 key (0600).  The account is
  looked up by this key each time (RFC 8555 §7.3.1: a newAccount with a
  known key answers 200 and the account's URL), so nothing else is kept.
- ``certificate.pem``: the certificate's private key followed by its chain
  (0600), written in one atomic rename so no reader ever sees a key without
  its certificate; ``net/tls.cert_and_key`` serves it once it exists.
- ``renewal.json``: when the server means to renew, and the last failure;
  ``postoffice cert status`` reads it.

Challenges: http-01 (RFC 8555 §8.3), answered by ``[listen] http`` from the
key authorizations published here in ``Services.acme_http01`` (net/web.py).
"""

from __future__ import annotations

import datetime
import logging

from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from postoffice.config.settings import Settings
from postoffice.net.cert_status import (
    CertificateInfo,
    acme_dir,
    certificate_info,
    certificate_names,
)
from postoffice.net.tls import acme_certificate
from postoffice.storage.safeio import atomic_write

log = logging.getLogger("postoffice.acme")

ACCOUNT_KEY = "account.key"
USER_AGENT = "postoffice-acme"
TIMEOUT_SECONDS = 30  # each HTTP request to the CA
ORDER_SECONDS = 90  # validation and issuance of one order


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class AcmeIssuer:
    """One ACME account at ``[acme] directory``; ``issue`` gets a certificate."""

    def __init__(self, settings: Settings, http01: dict[str, str]) -> None:
        self.settings = settings
        # Services.acme_http01: single dict operations, atomic under the GIL.
        self.http01 = http01
        self._client: client.ClientV2 | None = None

    def _account_key(self) -> JWKEC:
        directory = acme_dir(self.settings)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / ACCOUNT_KEY
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            atomic_write(path, _private_pem(key), 0o600)
            return JWKEC(key=key)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: not an EC key")
        return JWKEC(key=loaded)

    def account(self) -> client.ClientV2:
        """The account's client, registered (or found again) on first use."""
        if self._client is not None:
            return self._client
        acme = self.settings.acme
        net = client.ClientNetwork(
            self._account_key(), alg=ES256, user_agent=USER_AGENT, timeout=TIMEOUT_SECONDS
        )
        if acme.ca_bundle is not None:
            # requests takes a CA file path where acme types a bool
            # (ClientNetwork passes it on as requests' ``verify``).
            setattr(net, "verify_ssl", str(acme.ca_bundle))  # noqa: B010
        directory = client.ClientV2.get_directory(acme.directory, net)
        acme_client = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=acme.email or None, terms_of_service_agreed=True
        )
        try:
            acme_client.new_account(registration)
        except errors.ConflictError as known:  # this key's account exists already
            net.account = messages.RegistrationResource(
                uri=known.location, body=messages.Registration()
            )
        self._client = acme_client
        return acme_client

    def issue(self) -> CertificateInfo:
        """Order, prove and fetch a certificate for ``certificate_names``,
        then put it in place; raises on any failure (the old one stays)."""
        acme_client = self.account()
        names = certificate_names(self.settings)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = crypto_util.make_csr(_private_pem(key), names)
        order = acme_client.new_order(csr)
        published: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # proved recently (RFC 8555 §7.1.4)
                challenge = self._http01(authz)
                response, validation = challenge.response_and_validation(acme_client.net.key)
                token = challenge.chall.encode("token")
                self.http01[token] = validation
                published.append(token)
                acme_client.answer_challenge(challenge, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
            done = acme_client.poll_and_finalize(order, deadline)
        finally:
            for token in published:
                self.http01.pop(token, None)
        chain = done.fullchain_pem.encode()
        info = certificate_info(chain)
        atomic_write(acme_certificate(self.settings), _private_pem(key) + chain, 0o600)
        return info

    def _http01(self, authz: messages.AuthorizationResource) -> messages.ChallengeBody:
        if not self.settings.listen.http:
            raise RuntimeError("http-01 needs [listen] http (port 80 as the CA sees it)")
        for challenge in authz.body.challenges:
            if isinstance(challenge.chall, challenges.HTTP01):
                return challenge
        name = authz.body.identifier.value
        raise RuntimeError(f"the CA offers no http-01 challenge for {name}")

    def renewal_time(self, pem: bytes) -> tuple[datetime.datetime, str]:
        """When to renew: the CA's ARI window (RFC 9773) where its directory
        has renewalInfo, else 2/3 of the lifetime."""
        info = certificate_info(pem)
        try:
            suggested, _next_check = self.account().renewal_time(pem)
        except errors.ARIError as exc:
            log.warning("ACME: renewal information not fetched: %s", exc)
            suggested = None
        if suggested is None:
            return info.default_renewal, "2/3 of its lifetime"
        if suggested.tzinfo is None:
            suggested = suggested.astimezone(datetime.UTC)
        return suggested, "the CA's renewal information (ARI)"
