"""The page wrapper every web route goes through, and login and logout.

A page handler gets a ``Page`` (the request, its session, its form) only
after the wrapper has checked, in this order:

1. the request came over TLS (the routes are only on [listen] https; this
   is the second lock on the same door);
2. for admin pages, the client is in ``[web] admin_networks`` (when set):
   outside them even the login state is not revealed (403);
3. a live session: a GET without one is sent to /login (303), a POST is
   refused (403);
4. for admin pages, the session's user is flagged admin *now* (the flag is
   read from the account store on every request, so ``user admin --off``
   takes effect at once);
5. for a POST: an ``Origin`` that is not this site is refused (403), the
   body is a form, and its ``csrf`` field is the session's token (403).

Every answer carries security.SECURITY_HEADERS (CSP, frame denial...).
Login goes through ``Authenticator.login``, the same code and throttle as
SMTP AUTH, POP3 and IMAP; a throttled login gets 429 and its password is
not checked.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from postoffice import logfmt
from postoffice.net.http import Request, Response
from postoffice.policy.auth import WEB_PROTOCOL, LoginThrottled
from postoffice.policy.clients import client_address, in_networks
from postoffice.services import Services
from postoffice.web import security
from postoffice.web.dashboard import history_for
from postoffice.web.render import Renderer, StaticFile, static_files
from postoffice.web.security import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    FormError,
    LoginTokens,
    SessionTable,
    WebSession,
    credential_of,
)

log = logging.getLogger("postoffice.web")

T = TypeVar("T")

MAX_FORM_BODY = 96 * 1024  # the largest form: a Sieve script (64 KiB) and its fields
HTML = "text/html; charset=utf-8"


@dataclass
class Page:
    request: Request
    session: WebSession
    form: dict[str, str] = field(default_factory=dict)
    is_admin: bool = False


PageHandler = Callable[[Page], Awaitable[Response]]


class WebApp:
    """What the pages share: services, sessions, templates."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.sessions = SessionTable()
        self.login_tokens = LoginTokens()
        self.renderer = Renderer()
        self.static: dict[str, StaticFile] = static_files()
        from postoffice.delivery.outbound import Outbound

        stats = services.outbound.stats if isinstance(services.outbound, Outbound) else None
        self.history = history_for(services.executor, stats)

    # --- answers -----------------------------------------------------------------------
    def html(
        self,
        template: str,
        values: Mapping[str, Any],
        *,
        status: int = 200,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        body = self.renderer.page(template, {"notice": "", "error": "", **values})
        return Response(status, body, HTML, (*security.SECURITY_HEADERS, *headers))

    def page(self, template: str, page: Page, status: int = 200, **values: Any) -> Response:
        """A page for a logged-in user: the base template's values filled in."""
        base: dict[str, Any] = {
            "account": str(page.session.account),
            "csrf": page.session.csrf,
            "is_admin": page.is_admin,
            "notice": "",
            "error": "",
        }
        return self.html(template, {**base, **values}, status=status)

    def refuse(self, status: int, why: str) -> Response:
        return self.html("refused.html", {"status": status, "why": why}, status=status)

    @staticmethod
    def redirect(location: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return Response(
            303, b"", HTML, (*security.SECURITY_HEADERS, ("Location", location), *headers)
        )

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the server's I/O pool (SQLite, Maildir, log files)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.services.executor, fn, *args)

    # --- the wrapper -------------------------------------------------------------------
    def admin_network_ok(self, request: Request) -> bool:
        networks = self.services.settings.web.admin_networks
        if not networks:
            return True
        address = client_address(request.peer)
        return address is not None and in_networks(address, networks)

    def guarded(
        self, handler: PageHandler, *, admin: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            if not request.tls:
                return self.refuse(403, "these pages are served over TLS only")
            if admin and not self.admin_network_ok(request):
                return self.refuse(403, "the admin pages are not open to your network")
            cookies = security.parse_cookies(request.headers)
            session_id = cookies.get(SESSION_COOKIE)
            session = self.sessions.get(session_id)
            if session is not None and not self.still_valid(session):
                self.sessions.drop(session_id)
                session = None
            if session is None:
                if request.method in ("GET", "HEAD"):
                    return self.redirect("/login")
                return self.refuse(403, "you are not logged in (or your session ended)")
            is_admin = self.services.accounts.is_admin(session.account)
            if admin and not is_admin:
                return self.refuse(403, "this page is for admins")
            page = Page(request, session, is_admin=is_admin)
            if request.method == "POST":
                refusal = self.check_post(request, session.csrf, page)
                if refusal is not None:
                    return refusal
            return await handler(page)

        return serve

    def still_valid(self, session: WebSession) -> bool:
        """The account still exists with the password the session logged in with."""
        stored = self.services.accounts.password_hash(session.account)
        return stored is not None and hmac.compare_digest(credential_of(stored), session.credential)

    def check_post(self, request: Request, csrf: str, page: Page | None) -> Response | None:
        """None when a POST may go on (``page.form`` filled in); else the refusal."""
        if not same_origin(request):
            self._refused(request, "foreign Origin")
            return self.refuse(403, "this form was sent from another site")
        try:
            form = security.parse_form(request.header(b"content-type"), request.body)
        except FormError:
            return self.refuse(400, "that was not a form")
        if not security.tokens_match(csrf, form.get("csrf")):
            self._refused(request, "bad CSRF token")
            return self.refuse(403, "this form has expired or was not sent from this site")
        if page is not None:
            page.form = form
        return None

    @staticmethod
    def _refused(request: Request, why: str) -> None:
        log.warning(
            "web refused client=%s path=%s origin=%s: %s",
            request.peer,
            logfmt.field(request.path),
            logfmt.field((request.header(b"origin") or b"-").decode("latin-1")[:200]),
            why,
        )

    # --- login and logout --------------------------------------------------------------
    async def login_form(self, request: Request, *, error: str = "", status: int = 200) -> Response:
        cookie = LoginTokens.new_cookie()
        return self.html(
            "login.html",
            {"csrf": self.login_tokens.token(cookie), "error": error},
            status=status,
            headers=(security.set_cookie(LOGIN_COOKIE, cookie),),
        )

    async def login(self, request: Request) -> Response:
        if not request.tls:
            return self.refuse(403, "these pages are served over TLS only")
        if request.method in ("GET", "HEAD"):
            return await self.login_form(request)
        if not same_origin(request):
            self._refused(request, "foreign Origin")
            return self.refuse(403, "this form was sent from another site")
        try:
            form = security.parse_form(request.header(b"content-type"), request.body)
        except FormError:
            return self.refuse(400, "that was not a form")
        cookies = security.parse_cookies(request.headers)
        if not self.login_tokens.check(cookies.get(LOGIN_COOKIE), form.get("csrf")):
            self._refused(request, "bad CSRF token")
            return self.refuse(403, "this form has expired or was not sent from this site")
        name, password = form.get("username", ""), form.get("password", "")
        try:
            account = await self.services.authenticator.login(
                name, password, request.peer, WEB_PROTOCOL
            )
        except LoginThrottled:
            return await self.login_form(
                request, error="Too many failed logins: try again later.", status=429
            )
        if account is None:
            return await self.login_form(request, error="Wrong name or password.", status=403)
        # Whatever session id the browser had (or was given by someone
        # else) ends here: the login gets a new one.
        self.sessions.drop(cookies.get(SESSION_COOKIE))
        credential = credential_of(self.services.accounts.password_hash(account))
        session_id, _session = self.sessions.create(account, credential)
        log.info("web login client=%s user=%s", request.peer, logfmt.field(str(account)))
        where = "/admin" if self.services.accounts.is_admin(account) else "/account"
        return self.redirect(
            where,
            (
                security.set_cookie(SESSION_COOKIE, session_id),
                security.clear_cookie(LOGIN_COOKIE),
            ),
        )

    async def logout(self, page: Page) -> Response:
        cookies = security.parse_cookies(page.request.headers)
        self.sessions.drop(cookies.get(SESSION_COOKIE))
        return self.redirect("/login", (security.clear_cookie(SESSION_COOKIE),))

    async def home(self, request: Request) -> Response:
        return self.redirect("/account")

    async def static_file(self, request: Request) -> Response:
        found = self.static[request.path]  # routes exist only for these paths
        return Response(
            200,
            found.body,
            found.content_type,
            (("ETag", found.etag),),
        )


def same_origin(request: Request) -> bool:
    """No ``Origin`` (an older browser, a script: the CSRF token decides),
    or exactly ``https://`` and this request's own Host."""
    origin = request.header(b"origin")
    if origin is None:
        return True
    host = request.header(b"host")
    return host is not None and origin.strip().lower() == b"https://" + host.strip().lower()
