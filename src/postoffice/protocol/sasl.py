"""SASL on the server side (RFC 4422): one exchange, sans I/O, for every protocol.

SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034) carry the same exchange in
different wire forms: the server sends base64 challenges (SMTP ``334 ...``,
POP3 ``+ ...``), the client answers each with one base64 line, or ``*`` to
cancel, and may send its first response with the command itself (``=`` for
an empty one).  ``SaslExchange`` is that exchange, once: a session sends the
challenges in its own wire form, feeds back the client's lines, and hands
the credentials of a finished exchange to the authenticator (policy/auth.py).
No session decodes base64 or knows a mechanism.

A mechanism is a small class whose ``step`` takes the client's decoded
response and returns a ``Challenge``, ``Done`` or ``Fail``.  Here: PLAIN
(RFC 4616) and the de-facto LOGIN (draft-murchison-sasl-login).  SCRAM
(RFC 5802) is one more such class; as it needs the account's stored keys in
the middle of the exchange, it will add one outcome that asks the session
for them.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from postoffice.mail.address import AddressError, parse_mailbox

# RFC 4616 §2: each of authzid, authcid and passwd is at most 255 octets.
MAX_FIELD = 255
CANCEL = "*"  # RFC 4954 §4, RFC 5034 §4: the client abandons the exchange
EMPTY = "="  # RFC 4954 §4, RFC 5034 §4: an initial response that is empty, not absent


class SaslError(ValueError):
    """A client response a mechanism cannot use; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client; its answer goes to ``SaslExchange.respond``."""

    data: bytes

    @property
    def base64(self) -> str:
        """``data`` as the wire carries it; no data is "" (``334 ``, ``+ ``)."""
        return binascii.b2a_base64(self.data, newline=False).decode("ascii")


@dataclass(frozen=True, slots=True)
class Done:
    """The client gave its credentials: the authenticator checks them.

    ``authzid`` is "" or names the same account as ``authcid``
    (``authzid_permitted``): whoever logs in acts as themselves."""

    authcid: str
    password: str
    authzid: str = ""


class FailKind(enum.Enum):
    CANCELLED = "cancelled"  # the client answered a challenge with "*"
    MALFORMED = "malformed"  # not base64, or not what the mechanism expects
    NOT_PERMITTED = "not permitted"  # an authzid that names someone else


@dataclass(frozen=True, slots=True)
class Fail:
    """The exchange ended without credentials; ``reason`` is safe to show."""

    kind: FailKind
    reason: str


Outcome = Challenge | Done | Fail


class Mechanism(Protocol):
    """One mechanism's server side; a new instance for each exchange."""

    def step(self, response: bytes | None) -> Outcome:
        """Answer the client's decoded ``response`` (None: the command came
        without an initial response).  Raises SaslError for a response it
        cannot use; the exchange turns that into ``Fail(MALFORMED)``."""
        ...


def authzid_permitted(authzid: str, authcid: str) -> bool:
    """RFC 4616 §2 lets the server refuse an authzid: we refuse every one but
    the user's own (no logging in as one user to act as another).

    "Own" is decided as the account store finds accounts (``parse_mailbox``):
    the domain in any case and in U- or A-labels, and the local part in any
    case too, because account names are lower case and a login as
    ``Alice@Example.TEST`` is a login to ``alice@example.test``.  Comparing
    more strictly than the login itself would refuse a client that merely
    spells its own name as the user typed it; comparing more loosely would
    let one account act as another.  A name that is no mailbox is permitted
    only when it is the authcid exactly (the login then fails on its own).
    """
    if not authzid or authzid == authcid:
        return True
    try:
        return parse_mailbox(authzid) == parse_mailbox(authcid)
    except AddressError:
        return False


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError(f"{what} is not UTF-8") from exc


def _decode_base64(text: str) -> bytes:
    """Strict base64 (RFC 4648 §4, no line breaks); ``=`` alone is empty (RFC 4954 §4)."""
    if text in ("", EMPTY):
        return b""
    if not text.isascii():
        raise SaslError("response is not base64")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("response is not base64") from exc


_NO_DATA = Challenge(b"")
_USERNAME = Challenge(b"Username:")
_PASSWORD = Challenge(b"Password:")
_NOT_PERMITTED = Fail(FailKind.NOT_PERMITTED, "Acting as another user is not permitted")
_CANCELLED = Fail(FailKind.CANCELLED, "Authentication cancelled")


class Plain:
    """PLAIN (RFC 4616): one message, ``[authzid] NUL authcid NUL passwd``."""

    def step(self, response: bytes | None) -> Outcome:
        if response is None:
            # RFC 4422 §5: a client-first mechanism started without an
            # initial response asks for it with an empty challenge.
            return _NO_DATA
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
        if not parts[1] or not parts[2]:
            raise SaslError("PLAIN response needs a user name and a password")
        if any(len(part) > MAX_FIELD for part in parts):
            raise SaslError("PLAIN response field too long")
        authzid = _utf8(parts[0], "authzid")
        authcid = _utf8(parts[1], "user name")
        password = _utf8(parts[2], "password")
        if not authzid_permitted(authzid, authcid):
            return _NOT_PERMITTED
        return Done(authcid, password, authzid)


class Login:
    """LOGIN (draft-murchison-sasl-login-00): the user name, then the password,
    each asked for.  Clients may send the name as the initial response."""

    def __init__(self) -> None:
        self._name: str | None = None

    def step(self, response: bytes | None) -> Outcome:
        if response is None:
            return _USERNAME
        if len(response) > MAX_FIELD:
            raise SaslError("LOGIN response too long")
        if b"\0" in response:
            raise SaslError("LOGIN response contains NUL")
        text = _utf8(response, "LOGIN response")
        if self._name is None:
            self._name = text
            return _PASSWORD
        return Done(self._name, text)


# In the order offered (EHLO's AUTH line, POP3's CAPA and AUTH list).
_MECHANISMS: dict[str, Callable[[], Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}
MECHANISMS: tuple[str, ...] = tuple(_MECHANISMS)


class SaslExchange:
    """One AUTH exchange, server side: ``initial`` once, then ``respond`` to
    each ``Challenge`` until a ``Done`` or ``Fail`` ends it.

    Lines are taken as the core delivered them (surrounding white space is
    ignored); the client's ``*`` cancels only in answer to a challenge, since
    the grammar of an initial response is base64 or ``=`` (RFC 4954 §4).
    """

    def __init__(self, mechanism: Mechanism) -> None:
        self._mechanism = mechanism
        self._started = False
        self._challenged = False  # a Challenge awaits the client's answer

    @classmethod
    def start(cls, name: str) -> SaslExchange | None:
        """An exchange for the mechanism ``name`` (any case); None if not offered."""
        make = _MECHANISMS.get(name.upper())
        return None if make is None else cls(make())

    def initial(self, response: str | None) -> Outcome:
        """Begin with the command's initial response: None when it had none."""
        if self._started:
            raise RuntimeError("initial() begins a SASL exchange, once")
        self._started = True
        return self._step(response)

    def respond(self, line: str) -> Outcome:
        """The client's line answering the last ``Challenge``."""
        if not self._challenged:
            raise RuntimeError("respond() answers a SASL challenge; there is none")
        if line.strip() == CANCEL:
            self._challenged = False
            return _CANCELLED
        return self._step(line)

    def _step(self, text: str | None) -> Outcome:
        try:
            outcome = self._mechanism.step(None if text is None else _decode_base64(text.strip()))
        except SaslError as exc:
            outcome = Fail(FailKind.MALFORMED, str(exc))
        self._challenged = isinstance(outcome, Challenge)
        return outcome
