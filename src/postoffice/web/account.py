"""/account: what every mailbox owner may do for themselves.

- the password: the current one is checked by ``Authenticator.authenticate``
  (throttled like any login), the new one by the CLI's own rules
  (account_changes.check_password), hashed in the hashing pool; every other
  session of the account ends, and this browser gets a new session id;
- quota usage (storage/quota.py, as ``user quota`` reports it);
- the account's recent logins, by every protocol, with the client's address
  (policy/recent_logins.py);
- a vacation reply, written as a Sieve script named "vacation";
- the active Sieve script, edited as text; stored only if it compiles
  (delivery/sieve.py compile_script, as ``sieve put`` and ManageSieve do),
  else the error's line and column are shown and nothing changes.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from postoffice.delivery.sieve import compile_script
from postoffice.mail.address import Address
from postoffice.net.http import Response, Routes
from postoffice.policy.account_changes import check_password
from postoffice.policy.auth import LoginThrottled
from postoffice.protocol.sieve_parse import SieveSyntaxError
from postoffice.protocol.sieve_run import SieveCheckError
from postoffice.storage.accounts import AccountError
from postoffice.storage.maildir import mailbox_path
from postoffice.storage.quota import format_size, usage_blocking
from postoffice.storage.sieve_scripts import ScriptError, SieveScripts
from postoffice.web import security
from postoffice.web.app import MAX_FORM_BODY, Page, WebApp
from postoffice.web.security import credential_of

VACATION_SCRIPT = "vacation"
DEFAULT_SCRIPT = "default"
MAX_VACATION_DAYS = 90  # sieve_run caps :days there too
MAX_VACATION_TEXT = 8192


@dataclass(frozen=True, slots=True)
class Usage:
    used: str
    limit: str
    percent: int  # 0..100; 0 without a quota
    messages: int


def sieve_string(text: str) -> str:
    """``text`` as a Sieve quoted string (RFC 5228 §2.4.2: backslash and
    double quote escaped; CRLF kept as the line breaks of a reply)."""
    body = text.replace("\r\n", "\n").replace("\\", "\\\\").replace('"', '\\"')
    return '"' + body.replace("\n", "\r\n") + '"'


def vacation_script(days: int, subject: str, reason: str) -> bytes:
    lines = ['require ["vacation"];', f"vacation :days {days}"]
    if subject:
        lines[-1] += f" :subject {sieve_string(subject)}"
    lines[-1] += f" {sieve_string(reason)};"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


class AccountPages:
    def __init__(self, web: WebApp) -> None:
        self.web = web
        self.scripts = SieveScripts(web.services.settings.sieve_dir)

    def _usage(self, account: Address) -> Usage:
        settings = self.web.services.settings
        own = self.web.services.accounts.quota(account)
        limit = settings.limits.mailbox_quota if own is None else own
        found = usage_blocking(mailbox_path(settings.mail_dir, account), limit)
        percent = min(100, found.bytes * 100 // limit) if limit > 0 else 0
        shown = format_size(limit) if limit > 0 else "none"
        return Usage(format_size(found.bytes), shown, percent, found.messages)

    def _sieve(self, account: Address) -> tuple[str | None, str]:
        name = self.scripts.active_name(account)
        text = self.scripts.get(account, name).decode("utf-8", "replace") if name else ""
        return name, text

    async def show(self, page: Page, status: int = 200, **values: object) -> Response:
        account = page.session.account
        usage = await self.web.blocking(self._usage, account)
        active, script = await self.web.blocking(self._sieve, account)
        values.setdefault("script", script)
        logins = [
            (_when(login.time), login.protocol, login.client)
            for login in self.web.services.authenticator.recent.of(str(account))
        ]
        return self.web.page(
            "account.html",
            page,
            status,
            usage=usage,
            active_script=active or "",
            vacation_on=active == VACATION_SCRIPT,
            logins=logins,
            **values,
        )

    async def view(self, page: Page) -> Response:
        return await self.show(page)

    async def password(self, page: Page) -> Response:
        account = page.session.account
        form = page.form
        current, new, again = form.get("current", ""), form.get("new", ""), form.get("again", "")
        services = self.web.services
        try:
            ok = await services.authenticator.authenticate(
                account, current, page.request.peer, "web"
            )
        except LoginThrottled:
            return await self.show(page, 429, error="Too many failed attempts: try later.")
        if ok is None:
            return await self.show(page, 403, error="The current password is wrong.")
        if new != again:
            return await self.show(page, 400, error="The new passwords do not match.")
        try:
            check_password(new, account)
        except AccountError as exc:
            return await self.show(page, 400, error=str(exc))
        hashed = await services.authenticator.hash_password(new)
        try:
            await self.web.blocking(services.accounts.set_password, account, hashed)
        except AccountError as exc:
            return await self.show(page, 400, error=str(exc))
        # Sessions that knew the old password end; this one goes on under a new id.
        self.web.sessions.drop_account(account)
        session_id, session = self.web.sessions.create(account, credential_of(hashed))
        page.session = session
        response = await self.show(page, notice="Your password was changed.")
        cookie = security.set_cookie(security.SESSION_COOKIE, session_id)
        return Response(
            response.status, response.body, response.content_type, (*response.headers, cookie)
        )

    async def vacation(self, page: Page) -> Response:
        account = page.session.account
        form = page.form
        if form.get("enabled") != "on":
            await self.web.blocking(self._vacation_off, account)
            return await self.show(page, notice="The vacation reply is off.")
        subject, reason = form.get("subject", "").strip(), form.get("reason", "")
        try:
            days = int(form.get("days", "7"))
        except ValueError:
            days = 0
        if not 1 <= days <= MAX_VACATION_DAYS:
            return await self.show(page, 400, error=f"Days must be 1 to {MAX_VACATION_DAYS}.")
        if not reason.strip() or len(reason) > MAX_VACATION_TEXT or len(subject) > 200:
            return await self.show(
                page,
                400,
                error=f"The reply needs a text of at most {MAX_VACATION_TEXT} characters.",
            )
        if any(c in subject for c in "\r\n"):
            return await self.show(page, 400, error="The subject is one line.")
        return await self._store(page, VACATION_SCRIPT, vacation_script(days, subject, reason))

    def _vacation_off(self, account: Address) -> None:
        if self.scripts.active_name(account) == VACATION_SCRIPT:
            self.scripts.activate(account, None)

    async def sieve(self, page: Page) -> Response:
        text = page.form.get("script", "")
        account = page.session.account
        name = await self.web.blocking(self.scripts.active_name, account)
        if name in (None, VACATION_SCRIPT):
            name = DEFAULT_SCRIPT
        return await self._store(page, name, text.replace("\r\n", "\n").encode("utf-8"))

    async def _store(self, page: Page, name: str, data: bytes) -> Response:
        account = page.session.account
        try:
            compile_script(data)
        except (SieveSyntaxError, SieveCheckError) as exc:
            return await self.show(
                page,
                400,
                error=f"line {exc.line}, column {exc.column}: {exc.reason}",
                script=data.decode("utf-8", "replace"),
            )
        try:
            await self.web.blocking(self._put, account, name, data)
        except ScriptError as exc:
            return await self.show(page, 400, error=str(exc))
        return await self.show(page, notice=f"Script {name!r} saved and active.")

    def _put(self, account: Address, name: str, data: bytes) -> None:
        self.scripts.put(account, name, data)
        self.scripts.activate(account, name)


def add_routes(routes: Routes, web: WebApp) -> None:
    pages = AccountPages(web)
    routes.add("/account", web.guarded(pages.view))
    small = security.MAX_LOGIN_BODY
    routes.add("/account/password", web.guarded(pages.password), ("POST",), max_body=small)
    routes.add("/account/vacation", web.guarded(pages.vacation), ("POST",), max_body=MAX_FORM_BODY)
    routes.add("/account/sieve", web.guarded(pages.sieve), ("POST",), max_body=MAX_FORM_BODY)
