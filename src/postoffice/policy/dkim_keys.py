"""DKIM signing keys: made by the CLI, stored per domain, read by the server.

Layout (directories 0700, private keys 0600)::

    data_dir/dkim/<domain>/keys.json          the active selectors (written last, atomically)
    data_dir/dkim/<domain>/<selector>.pem     one private key per selector

Each domain gets two keys (RFC 6376 §3.3, RFC 8463 §3): RSA 2048
(``rsa-sha256``, what every verifier checks) and Ed25519
(``ed25519-sha256``, a second signature for verifiers that know it).
Selectors are ``<yyyymm>r`` and ``<yyyymm>e``, with a counter when that
month's name is taken, so a rotation never reuses a name whose old key may
still be cached in DNS.  ``keys.json`` names the active keys; files of older
selectors stay until the administrator deletes them (their DNS records
should stay published a few days after a rotation).

``KeyStore`` is the server's view: it re-reads a domain's keys whenever
``keys.json`` changes (one ``stat`` per message), so a key made while the
server runs is used from the next message on.

With ``[cluster] database`` the same keys (made by the same code here) live
in PostgreSQL instead, so every node signs with them: cluster/dkim_keys.py,
chosen by cluster/stores.py.  Such a key carries its PEM (``DkimKey.pem``)
rather than a file name.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postoffice.mail.address import AddressError, normalise_domain
from postoffice.storage.safeio import fsync_dir, write_all

KEYS_FILE = "keys.json"
RSA_BITS = 2048
RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
ALGORITHMS = (RSA, ED25519)
_SUFFIX = {RSA: "r", ED25519: "e"}


class DkimKeyError(Exception):
    """Keys cannot be made or read; ``str()`` is the line users see."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: str  # RSA or ED25519
    path: Path | None  # the private key (PEM) in a file, or
    pem: bytes | None = None  # the PEM itself ([cluster]: read from the database)

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def where(self) -> str:
        """Where the private key is, for messages."""
        return str(self.path) if self.path is not None else f"[cluster] database: {self.dns_name}"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key as dkimpy signs with it."""

    key: DkimKey
    private: bytes  # RSA: PKCS#1 PEM; Ed25519: the base64 32-byte seed (dkimpy's forms)


class SigningKeys(Protocol):
    """What the signer asks: ``KeyStore`` here, or the [cluster] one."""

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The domain's signing keys ([] when it has none); DkimKeyError when
        they exist but cannot be used.  Called from worker threads."""
        ...

    def close(self) -> None:
        """Stop following changes (a listener thread), if it does."""
        ...


def dkim_dir(data_dir: Path) -> Path:
    return data_dir / "dkim"


def domain_dir(data_dir: Path, domain: str) -> Path:
    return dkim_dir(data_dir) / key_domain(domain)


def key_domain(domain: str) -> str:
    """The domain as keys are filed under it; DkimKeyError if it is none."""
    try:
        name = normalise_domain(domain.strip())
    except AddressError as exc:
        raise DkimKeyError(f"{domain!r}: {exc}") from None
    if name.startswith("["):
        raise DkimKeyError(f"{domain!r} is not a domain name")
    return name


# --- making keys ---------------------------------------------------------------------------
def private_pem(algorithm: str) -> bytes:
    """A new private key of ``algorithm``, PEM."""
    if algorithm == RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1: what dkimpy reads
            serialization.NoEncryption(),
        )
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600, never over an existing file) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # also when it existed, or the umask widened it


def _selector(directory: Path, algorithm: str, now: datetime.datetime) -> str:
    return new_selector(lambda name: (directory / f"{name}.pem").exists(), algorithm, now)


def new_selector(taken: Callable[[str], bool], algorithm: str, now: datetime.datetime) -> str:
    """``<yyyymm>r`` / ``<yyyymm>e``, with a counter when ``taken``: never a
    name used before (its old key may still be cached in DNS)."""
    base = f"{now:%Y%m}{_SUFFIX[algorithm]}"
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}{n}"
        if not taken(name):
            return name
    raise DkimKeyError(f"no free selector name left for {base}")


def generate(
    data_dir: Path, domain: str, *, rotate: bool = False, now: datetime.datetime | None = None
) -> list[DkimKey]:
    """Make an RSA and an Ed25519 key for ``domain`` and make them the active
    ones.  Refuse when the domain has keys already, unless ``rotate``."""
    name = key_domain(domain)
    directory = domain_dir(data_dir, name)
    existing = load_keys(data_dir, name)
    if existing and not rotate:
        raise has_keys_already(name, [k.selector for k in existing])
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _private_dir(dkim_dir(data_dir))
    _private_dir(directory)
    when = now or datetime.datetime.now(datetime.UTC)
    keys = []
    for algorithm in ALGORITHMS:
        selector = _selector(directory, algorithm, when)
        path = directory / f"{selector}.pem"
        _write_new(path, private_pem(algorithm))
        keys.append(DkimKey(name, selector, algorithm, path))
    fsync_dir(directory)
    _write_index(directory, name, keys, existing, when)
    return keys


def has_keys_already(domain: str, selectors: list[str]) -> DkimKeyError:
    return DkimKeyError(
        f"{domain} has DKIM keys already (selectors {', '.join(selectors)}); show them with"
        f" `postoffice dkim show {domain}`, or make new ones with --rotate"
    )


def _write_index(
    directory: Path,
    domain: str,
    keys: list[DkimKey],
    previous: list[DkimKey],
    when: datetime.datetime,
) -> None:
    raw = {
        "domain": domain,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "keys": [{"selector": k.selector, "algorithm": k.algorithm} for k in keys],
        "previous": [k.selector for k in previous],
    }
    tmp = directory / f".{KEYS_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _write_new(tmp, (json.dumps(raw, indent=2) + "\n").encode())
    os.replace(tmp, directory / KEYS_FILE)  # the server sees all new keys or none
    fsync_dir(directory)


# --- every key, for `cluster migrate` / `export` (cluster/dkim_move.py) ------------------------
@dataclass(frozen=True, slots=True)
class StoredKey:
    selector: str
    algorithm: str
    pem: bytes
    active: bool


def all_keys(data_dir: Path) -> dict[str, list[StoredKey]]:
    """Every domain's keys, active or not, by selector.  A domain directory
    without ``keys.json`` (a copy cut short) counts as no keys."""
    found: dict[str, list[StoredKey]] = {}
    root = dkim_dir(data_dir)
    if not root.is_dir():
        return found
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        domain = directory.name
        if not (directory / KEYS_FILE).exists():
            continue
        active = {k.selector for k in load_keys(data_dir, domain)}
        keys = []
        for path in sorted(directory.glob("*.pem")):
            pem = path.read_bytes()
            key = DkimKey(domain, path.stem, RSA, None, pem)
            private = _load_private(key)
            algorithm = RSA if isinstance(private, rsa.RSAPrivateKey) else ED25519
            keys.append(StoredKey(path.stem, algorithm, pem, path.stem in active))
        found[domain] = keys
    return found


def store_keys(data_dir: Path, domain: str, keys: list[StoredKey], when: datetime.datetime) -> None:
    """Write ``domain``'s keys (the PEM files, then ``keys.json`` naming the
    active ones); a file there already must hold the same key."""
    name = key_domain(domain)
    directory = domain_dir(data_dir, name)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _private_dir(dkim_dir(data_dir))
    _private_dir(directory)
    for key in keys:
        if "/" in key.selector or key.selector.startswith("."):
            raise DkimKeyError(f"{name}: bad selector {key.selector!r}")
        path = directory / f"{key.selector}.pem"
        if path.exists():
            if path.read_bytes() != key.pem:
                raise DkimKeyError(f"{path} exists with another key")
            continue
        _write_new(path, key.pem)
    fsync_dir(directory)
    active = [DkimKey(name, k.selector, k.algorithm, directory / f"{k.selector}.pem") for k in keys]
    active = [k for k, stored in zip(active, keys, strict=True) if stored.active]
    active.sort(key=lambda k: ALGORITHMS.index(k.algorithm))
    _write_index(directory, name, active, [], when)


# --- reading keys ------------------------------------------------------------------------------
def load_keys(data_dir: Path, domain: str) -> list[DkimKey]:
    """The active keys of ``domain`` ([] when it has none); DkimKeyError when
    ``keys.json`` is unreadable or names a selector without its key file."""
    name = key_domain(domain)
    directory = domain_dir(data_dir, name)
    try:
        raw = json.loads((directory / KEYS_FILE).read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise DkimKeyError(f"{directory / KEYS_FILE}: unreadable: {exc}") from None
    keys = []
    try:
        for item in raw["keys"]:
            selector, algorithm = str(item["selector"]), str(item["algorithm"])
            if algorithm not in ALGORITHMS or "/" in selector or selector.startswith("."):
                raise ValueError(f"bad key entry {item!r}")
            keys.append(DkimKey(name, selector, algorithm, directory / f"{selector}.pem"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DkimKeyError(f"{directory / KEYS_FILE}: {exc}") from None
    return keys


def _load_private(key: DkimKey) -> object:
    if key.pem is not None:
        data = key.pem
    else:
        assert key.path is not None
        try:
            data = key.path.read_bytes()
        except OSError as exc:
            raise DkimKeyError(f"{key.path}: {exc.strerror or exc}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"{key.where}: not a usable private key: {exc}") from None


def signing_key(key: DkimKey) -> SigningKey:
    private = _load_private(key)
    if key.algorithm == RSA and isinstance(private, rsa.RSAPrivateKey):
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return SigningKey(key, pem)
    if key.algorithm == ED25519 and isinstance(private, ed25519.Ed25519PrivateKey):
        seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return SigningKey(key, base64.b64encode(seed))
    raise DkimKeyError(f"{key.where}: not an {key.algorithm} key")


def public_key_data(key: DkimKey) -> str:
    """The p= value: base64 of the DER SubjectPublicKeyInfo for RSA (RFC 6376
    §3.6.1), of the raw 32-byte public key for Ed25519 (RFC 8463 §4.2)."""
    private = _load_private(key)
    if isinstance(private, rsa.RSAPrivateKey):
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode("ascii")
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode("ascii")
    raise DkimKeyError(f"{key.where}: not an RSA or Ed25519 key")


def txt_record(key: DkimKey) -> str:
    """The TXT record to publish at ``<selector>._domainkey.<domain>``."""
    kind = "rsa" if key.algorithm == RSA else "ed25519"
    return f"v=DKIM1; k={kind}; p={public_key_data(key)}"


def zone_txt(name: str, text: str) -> str:
    """A zone-file TXT line; long values split into strings of at most 255
    characters (RFC 1035 §3.3.14; verifiers join them, RFC 6376 §3.6.2.2)."""
    parts = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    quoted = " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    if len(parts) == 1:
        return f"{name}. IN TXT {quoted}"
    return f"{name}. IN TXT ( {quoted} )"


# --- the server's view ------------------------------------------------------------------------
class KeyStore:
    """Signing keys by domain, re-read when a domain's ``keys.json`` changes.
    Thread-safe: signing runs in worker threads."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], list[SigningKey]]] = {}

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The domain's signing keys ([] when it has none); DkimKeyError when
        they exist but cannot be used."""
        name = key_domain(domain)
        index = domain_dir(self._data_dir, name) / KEYS_FILE
        try:
            st = index.stat()
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(name, None)
            return []
        except OSError as exc:
            raise DkimKeyError(f"{index}: {exc.strerror or exc}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        keys = [signing_key(k) for k in load_keys(self._data_dir, name)]
        with self._lock:
            self._cache[name] = (stamp, keys)
        return keys

    def close(self) -> None:
        """Nothing to stop: changes are seen by ``stat`` when asked."""
