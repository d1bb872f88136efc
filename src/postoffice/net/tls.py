"""TLS: the server's SSLContext, and a self-signed certificate for the default.

With no ``[tls]`` in the config, a self-signed RSA-2048 leaf certificate
(CA:FALSE, server authentication only) for the hostname (and localhost,
127.0.0.1, ::1) is made on first start with ``cryptography`` and kept in
``data_dir/tls`` (key mode 0600), so STARTTLS, POP3S and submission work out
of the box; a real deployment points ``[tls] cert``/``key`` at its ACME
chain.  A certificate already there is kept as it is (clients may have
pinned it).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postoffice.config.settings import Settings
from postoffice.storage.safeio import atomic_write

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"


def ensure_self_signed(tls_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) in ``tls_dir``, generating them if missing.  Blocking."""
    cert_path, key_path = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt_names.append(x509.DNSName("localhost"))
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # A leaf, not a CA (RFC 5280 §4.2.1.9): whoever trusts this certificate
        # (a client's pinned trust file) must not thereby trust anything it
        # might sign.  Key usages of a TLS server with an RSA key (RFC 5280
        # §4.2.1.3, §4.2.1.12): signatures (ECDHE) and key encipherment (RSA
        # key exchange, TLS 1.2), server authentication only.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(key_path, key_bytes, 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def acme_certificate(settings: Settings) -> Path:
    """Where net/acme.py keeps the issued key and chain (one file, 0600)."""
    return settings.data_dir / "acme" / "certificate.pem"


def served_certificate(settings: Settings) -> tuple[str, Path]:
    """(which, chain file) of what ``cert_and_key`` serves, making nothing:
    "acme", "[tls] cert" or "self-signed" (doctor, ``cert status``)."""
    issued = acme_certificate(settings)
    if settings.acme.directory and issued.is_file():
        return "acme", issued
    if settings.tls.cert is not None:
        return "[tls] cert", settings.tls.cert
    return "self-signed", settings.tls_dir / CERT_NAME


def cert_and_key(settings: Settings) -> tuple[Path, Path]:
    """The certificate to serve: ACME's once there is one (net/acme.py: key and
    chain in one file), else [tls] files, else the self-signed pair."""
    if settings.acme.directory:
        issued = acme_certificate(settings)
        if issued.is_file():
            return issued, issued
    if settings.tls.cert and settings.tls.key:
        return settings.tls.cert, settings.tls.key
    return ensure_self_signed(settings.tls_dir, settings.hostname)


ACME_TLS_ALPN = "acme-tls/1"  # RFC 8737 §6.2


def answer_tls_alpn(ctx: ssl.SSLContext, challenges: dict[str, ssl.SSLContext]) -> None:
    """Serve an ACME tls-alpn-01 validation (RFC 8737 §3) on ``ctx``: a
    ClientHello naming a name with a challenge under way gets that
    challenge's context (its certificate, ALPN "acme-tls/1").  Python cannot
    see the client's ALPN offer at SNI time, so for the second or so of a
    validation an ordinary client naming that name gets the challenge
    certificate too; net/acme.py uses tls-alpn-01 only without [listen] http."""

    def pick(conn: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        chosen = challenges.get(name.lower()) if name else None
        if chosen is not None:
            conn.context = chosen

    ctx.sni_callback = pick


# Mozilla's "intermediate" server configuration (ssl-config.mozilla.org,
# guidelines v5.7): TLS 1.2 with forward-secret AEAD suites only (no CBC, no
# SHA-1 MACs, no RSA key exchange); TLS 1.3's suites are all good and are
# OpenSSL's defaults.  The DHE suites apply only if DH parameters are
# loaded, which they are not: ECDHE is offered.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context to Mozilla's "intermediate" profile; raises
    ssl.SSLError / OSError on bad files.

    ``cert`` is served whole: a fullchain file (leaf, then intermediates, as
    ACME clients write it) sends every certificate in it, so clients that
    know only the root can build the path (RFC 8446 §4.4.2).  The client's
    suite order is kept (no server preference), as the profile says: every
    suite offered is strong, and a client without AES hardware puts
    ChaCha20 first."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.load_cert_chain(cert, key)
    return ctx
