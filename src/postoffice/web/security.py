"""Sessions, CSRF tokens, cookies and form bodies for the web pages.

Pure (an injected clock, no I/O): the page wrapper (web/app.py) asks it.

- **Sessions are server-side**: the cookie holds a random 256-bit id and
  nothing else; the table keeps only its SHA-256, so even a dump of the
  process's memory names no usable cookie.  A session is made only by a
  successful login, with a fresh id, so an id planted before the login
  (session fixation) is never the one logged in; logout drops it.  Each
  ends after ``IDLE_SECONDS`` without a request and ``MAX_AGE_SECONDS``
  after its login, and at most ``MAX_SESSIONS`` are kept (the least
  recently used goes first).  They live in the serving process: a restart
  logs everyone out, which is the safe direction.
- **CSRF**: each session has its own random token, put in every form and
  compared in constant time.  The login form, before any session, is bound
  to a random pre-login cookie by an HMAC under a per-process key (no
  table a flood of GETs could fill).  SameSite=Strict and the Origin
  check (web/app.py) stand behind both.
- **Cookies**: ``__Host-`` names (the browser then requires Secure, Path=/
  and no Domain), HttpOnly, SameSite=Strict.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from postoffice.mail.address import Address

SESSION_COOKIE = "__Host-postoffice-session"
LOGIN_COOKIE = "__Host-postoffice-login"
IDLE_SECONDS = 30 * 60
MAX_AGE_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
MAX_FORM_FIELDS = 50
MAX_COOKIE_PAIRS = 50
MAX_LOGIN_BODY = 4096  # a login or logout form: a name, a password, a token

# What every page is sent with.  No inline script or style at all: the
# pages have no script, their CSS is /static/style.css, and inline SVG
# plots use presentation attributes (not style=).
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CSP),
    ("X-Frame-Options", "DENY"),
    # Not "no-referrer": with it Chromium sends "Origin: null" on the pages'
    # own form posts, and the Origin check would refuse them.
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


@dataclass
class WebSession:
    account: Address
    csrf: str
    created: float
    seen: float
    # A digest of the account's password hash at login: a session ends when
    # it no longer matches (the password was changed, by the CLI too, or the
    # user removed), checked at every request.
    credential: bytes = b""


def credential_of(password_hash: str | None) -> bytes:
    """What a session remembers of the account's stored hash (never the hash)."""
    if password_hash is None:
        return b""
    return hashlib.sha256(password_hash.encode("utf-8", "replace")).digest()


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


class SessionTable:
    """Logged-in sessions by the digest of their id; bounded, timed out."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        idle: float = IDLE_SECONDS,
        max_age: float = MAX_AGE_SECONDS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self._clock = clock
        self._idle, self._max_age, self._max = idle, max_age, max_sessions
        self._table: OrderedDict[bytes, WebSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def create(self, account: Address, credential: bytes = b"") -> tuple[str, WebSession]:
        """A new session with a new random id (the cookie's value)."""
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        session = WebSession(account, secrets.token_urlsafe(32), now, now, credential)
        self._table[_digest(session_id)] = session
        while len(self._table) > self._max:
            self._table.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> WebSession | None:
        """The live session of ``session_id`` (touched), or None."""
        if not session_id or len(session_id) > 100:
            return None
        key = _digest(session_id)
        session = self._table.get(key)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > self._idle or now - session.created > self._max_age:
            del self._table[key]
            return None
        session.seen = now
        self._table.move_to_end(key)
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._table.pop(_digest(session_id), None)

    def drop_account(self, account: Address) -> None:
        """Log ``account`` out everywhere (its password changed, say)."""
        for key in [k for k, s in self._table.items() if s.account == account]:
            del self._table[key]


class LoginTokens:
    """The login form's CSRF token: HMAC of a random pre-login cookie."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)  # never leaves this process

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(32)

    def token(self, cookie: str) -> str:
        return hmac.new(self._key, cookie.encode("ascii", "replace"), hashlib.sha256).hexdigest()

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        return hmac.compare_digest(self.token(cookie), token)


def tokens_match(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(
        expected.encode("ascii", "replace"), given.encode("ascii", "replace")
    )


def set_cookie(name: str, value: str, *, max_age: int | None = None) -> tuple[str, str]:
    """A Set-Cookie header with every flag a session cookie needs."""
    parts = [f"{name}={value}", "Path=/", "Secure", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return ("Set-Cookie", "; ".join(parts))


def clear_cookie(name: str) -> tuple[str, str]:
    return set_cookie(name, "", max_age=0)


def parse_cookies(headers: tuple[tuple[bytes, bytes], ...]) -> dict[str, str]:
    """``Cookie`` fields (RFC 6265 §5.4: name=value pairs split by ";"), the
    first value of each name; bounded in pairs, never raising."""
    found: dict[str, str] = {}
    pairs = 0
    for name, value in headers:
        if name != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            pairs += 1
            if pairs > MAX_COOKIE_PAIRS:
                return found
            key, sep, val = part.partition("=")
            key = key.strip()
            if sep and key and key not in found:
                found[key] = val.strip()
    return found


class FormError(ValueError):
    """A form body that is not one (wrong type, not UTF-8, too many fields)."""


def parse_form(content_type: bytes | None, body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body; the first value of each field."""
    kind = (content_type or b"").split(b";", 1)[0].strip().lower()
    if kind != b"application/x-www-form-urlencoded":
        raise FormError("not a form")
    try:
        text = body.decode("ascii")
        fields = urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
            encoding="utf-8",
            errors="strict",
        )
    except (UnicodeError, ValueError) as exc:
        raise FormError(str(exc)) from None
    form: dict[str, str] = {}
    for key, value in fields:
        form.setdefault(key, value)
    return form
