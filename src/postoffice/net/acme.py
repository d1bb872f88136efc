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

Challenges: http-01 (RFC 8555 §8.3) when ``[listen] http`` is on, answered
there from the key authorizations published here in ``Services.acme_http01``
(net/web.py); else tls-alpn-01 (RFC 8737) on ``[listen] https``, from the
contexts in ``Services.acme_tls_alpn`` (net/tls.answer_tls_alpn).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
import tempfile
from pathlib import Path

from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from josepy.b64 import b64encode
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from postoffice.config.settings import Settings
from postoffice.net.cert_status import (
    CertificateInfo,
    acme_dir,
    certificate_info,
    certificate_names,
)
from postoffice.net.tls import ACME_TLS_ALPN, acme_certificate
from postoffice.storage.safeio import atomic_write

log = logging.getLogger("postoffice.acme")

ACCOUNT_KEY = "account.key"
USER_AGENT = "postoffice-acme"
TIMEOUT_SECONDS = 30  # each HTTP request to the CA
ORDER_SECONDS = 90  # validation and issuance of one order
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class _EmptyResponse(challenges.ChallengeResponse):
    """A challenge response with no fields: "{}" (RFC 8555 §7.5.1)."""

    typ = "tls-alpn-01"

    def __bool__(self) -> bool:
        # ClientNetwork sends a falsy object (no fields: len() 0) as an empty
        # payload, a POST-as-GET (RFC 8555 §6.3) that answers nothing.
        return True


def _tls_alpn_context(directory: Path, name: str, key_authorization: str) -> ssl.SSLContext:
    """The RFC 8737 §3 validation certificate for ``name`` in a TLS context
    that offers only ALPN "acme-tls/1"."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    digest = hashlib.sha256(key_authorization.encode()).digest()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # id-pe-acmeIdentifier, critical, its value the DER OCTET STRING of
        # the SHA-256 of the key authorization (RFC 8737 §3).
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    # load_cert_chain reads only files: a private one, gone once loaded.
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".pem") as pem:
        pem.write(_private_pem(key) + cert.public_bytes(serialization.Encoding.PEM))
        pem.flush()
        ctx.load_cert_chain(pem.name)
    return ctx


class AcmeIssuer:
    """One ACME account at ``[acme] directory``; ``issue`` gets a certificate."""

    def __init__(
        self, settings: Settings, http01: dict[str, str], tls_alpn: dict[str, ssl.SSLContext]
    ) -> None:
        self.settings = settings
        # Services.acme_http01 and acme_tls_alpn: single dict operations,
        # atomic under the GIL, read by the loop.
        self.http01 = http01
        self.tls_alpn = tls_alpn
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
        key = self._certificate_key()
        csr = crypto_util.make_csr(_private_pem(key), names)
        order = acme_client.new_order(csr)
        tokens: list[str] = []  # http-01, published in self.http01
        alpn_names: list[str] = []  # tls-alpn-01, in self.tls_alpn
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # proved recently (RFC 8555 §7.1.4)
                if self.settings.listen.http:
                    tokens.append(self._publish_http01(acme_client, authz))
                else:
                    alpn_names.append(self._publish_tls_alpn01(acme_client, authz))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
            done = acme_client.poll_and_finalize(order, deadline)
        finally:
            for token in tokens:
                self.http01.pop(token, None)
            for name in alpn_names:
                self.tls_alpn.pop(name, None)
        chain = done.fullchain_pem.encode()
        info = certificate_info(chain)
        atomic_write(acme_certificate(self.settings), _private_pem(key) + chain, 0o600)
        return info

    def _certificate_key(self) -> ec.EllipticCurvePrivateKey:
        """The current certificate's key, kept across renewals (certbot's
        --reuse-key): a published TLSA 3 1 1 record (DANE, RFC 7671 §5.1)
        names the key, and would stop matching at each renewal otherwise."""
        try:
            pem = acme_certificate(self.settings).read_bytes()
            loaded = serialization.load_pem_private_key(pem, password=None)
        except (OSError, ValueError):
            return ec.generate_private_key(ec.SECP256R1())
        if isinstance(loaded, ec.EllipticCurvePrivateKey):
            return loaded
        return ec.generate_private_key(ec.SECP256R1())

    def _challenge(
        self, authz: messages.AuthorizationResource, kind: str
    ) -> messages.ChallengeBody:
        for challenge in authz.body.challenges:
            if challenge.chall.typ == kind or (
                isinstance(challenge.chall, challenges.UnrecognizedChallenge)
                and challenge.chall.jobj.get("type") == kind
            ):
                return challenge
        name = authz.body.identifier.value
        raise RuntimeError(f"the CA offers no {kind} challenge for {name}")

    def _publish_http01(
        self, acme_client: client.ClientV2, authz: messages.AuthorizationResource
    ) -> str:
        """RFC 8555 §8.3: the key authorization at
        http://<name>/.well-known/acme-challenge/<token> ([listen] http)."""
        challenge = self._challenge(authz, "http-01")
        response, validation = challenge.response_and_validation(acme_client.net.key)
        token: str = challenge.chall.encode("token")
        self.http01[token] = validation
        acme_client.answer_challenge(challenge, response)
        return token

    def _publish_tls_alpn01(
        self, acme_client: client.ClientV2, authz: messages.AuthorizationResource
    ) -> str:
        """RFC 8737: a self-signed certificate for the name carrying the
        key authorization's SHA-256, served on [listen] https to a client
        that asks for ALPN "acme-tls/1" (net/tls.answer_tls_alpn).  certbot's
        acme no longer has this challenge: its key authorization and empty
        response (RFC 8555 §8.1, §7.5.1) are made here."""
        if not self.settings.listen.https:
            raise RuntimeError("ACME needs [listen] http (http-01) or https (tls-alpn-01)")
        challenge = self._challenge(authz, "tls-alpn-01")
        chall = challenge.chall
        # acme < 5 still parses the challenge (TLSALPN01); later ones do not.
        unparsed = isinstance(chall, challenges.UnrecognizedChallenge)
        token = str(chall.jobj["token"] if unparsed else chall.encode("token"))
        account_key = acme_client.net.key
        if account_key is None:
            raise RuntimeError("no account key")
        thumbprint = b64encode(account_key.thumbprint()).decode()
        name = str(authz.body.identifier.value).lower()
        self.tls_alpn[name] = _tls_alpn_context(
            acme_dir(self.settings), name, f"{token}.{thumbprint}"
        )
        acme_client.answer_challenge(challenge, _EmptyResponse())
        return name

    def renewal_time(self, pem: bytes) -> tuple[datetime.datetime, str]:
        """When to renew: the CA's ARI window (RFC 9773) where its directory
        has renewalInfo, else 2/3 of the lifetime."""
        info = certificate_info(pem)
        now = datetime.datetime.now(datetime.UTC)
        if info.not_after <= now:
            return now, "it has expired"
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
