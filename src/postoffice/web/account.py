"""/account: what every mailbox owner may do for themselves.

- the password: the current one is checked by ``Authenticator.authenticate``
  (throttled like any login), the new one by the CLI's own rules
  (account_changes.check_password), hashed in the hashing pool; every other
  session of the account ends, and this browser gets a new session id;
- quota usage (storage/quota.py, as ``user quota`` reports it);
- app passwords, one per mail client, made and revoked here
  (policy/app_passwords.py);
- the account's recent logins, by every protocol, with the client's address
  (policy/recent_logins.py);
- forwarding and a vacation reply, written as the page's own Sieve script
  (web/rules.py), made the active one;
- the active Sieve script, edited as text; stored only if it compiles
  (delivery/sieve.py compile_script, as ``sieve put`` and ManageSieve do),
  else the error's line and column are shown and nothing changes.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

from postoffice.delivery.sieve import compile_script
from postoffice.mail.address import Address, AddressError, parse_address
from postoffice.net.http import Response, Routes
from postoffice.policy import app_passwords
from postoffice.policy.account_changes import check_password
from postoffice.policy.auth import WEB_PROTOCOL, LoginThrottled
from postoffice.protocol.sieve_parse import SieveSyntaxError
from postoffice.protocol.sieve_run import SieveCheckError
from postoffice.storage.accounts import AccountError
from postoffice.storage.maildir import mailbox_path
from postoffice.storage.quota import format_size, usage_blocking
from postoffice.storage.sieve_scripts import ScriptError, SieveScripts
from postoffice.web import rules as rules_module
from postoffice.web import security
from postoffice.web.app import MAX_FORM_BODY, Page, WebApp
from postoffice.web.security import credential_of

DEFAULT_SCRIPT = "default"


@dataclass(frozen=True, slots=True)
class Usage:
    used: str
    limit: str
    percent: int  # 0..100; 0 without a quota
    messages: int


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
        ours = active == rules_module.SCRIPT_NAME
        rules = rules_module.read(script.encode("utf-8")) if ours else rules_module.AccountRules()
        logins = [
            (_when(login.time), login.protocol, login.client)
            for login in self.web.services.authenticator.recent.of(str(account))
        ]
        apps = [
            (p.id, p.label, _when(p.created))
            for p in self.web.services.accounts.app_passwords(account)
        ]
        return self.web.page(
            "account.html",
            page,
            status,
            usage=usage,
            active_script=active or "",
            rules=rules,
            rules_active=active == rules_module.SCRIPT_NAME,
            logins=logins,
            apps=apps,
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
                account, current, page.request.peer, WEB_PROTOCOL
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

    async def app_password(self, page: Page) -> Response:
        """Make an app password (shown once, in this answer only) or revoke one."""
        account = page.session.account
        accounts = self.web.services.accounts
        form = page.form
        try:
            if form.get("action") == "remove":
                await self.web.blocking(accounts.remove_app_password, account, form.get("id", ""))
                return await self.show(page, notice="The app password was revoked.")
            label = form.get("label", "")
            secret = app_passwords.generate()
            digest = app_passwords.digest(secret)
            assert digest is not None  # a generated one always is one
            await self.web.blocking(accounts.add_app_password, account, label, digest)
        except AccountError as exc:
            return await self.show(page, 400, error=str(exc))
        return await self.show(
            page,
            notice=f"Your new app password for {label.strip()}: {secret}\n"
            "Type it into that mail client now: it is not shown again.",
            new_app_password=secret,
        )

    async def _current_rules(self, account: Address) -> rules_module.AccountRules:
        active, script = await self.web.blocking(self._sieve, account)
        if active != rules_module.SCRIPT_NAME:
            return rules_module.AccountRules()
        return rules_module.read(script.encode("utf-8"))

    async def vacation(self, page: Page) -> Response:
        account = page.session.account
        form = page.form
        current = await self._current_rules(account)
        if form.get("enabled") != "on":
            changed = dataclasses.replace(current, vacation=False)
            return await self._save_rules(page, changed, "The vacation reply is off.")
        subject, reason = form.get("subject", "").strip(), form.get("reason", "")
        try:
            days = int(form.get("days", "7"))
        except ValueError:
            days = 0
        if not 1 <= days <= rules_module.MAX_DAYS:
            return await self.show(page, 400, error=f"Days must be 1 to {rules_module.MAX_DAYS}.")
        if not reason.strip() or len(reason) > rules_module.MAX_REASON:
            return await self.show(
                page,
                400,
                error=f"The reply needs a text of at most {rules_module.MAX_REASON} characters.",
            )
        if len(subject) > rules_module.MAX_SUBJECT or any(c in subject for c in "\r\n"):
            return await self.show(page, 400, error="The subject is one line, 200 at most.")
        changed = dataclasses.replace(
            current, vacation=True, days=days, subject=subject, reason=reason
        )
        return await self._save_rules(page, changed, "The vacation reply is on.")

    async def forwarding(self, page: Page) -> Response:
        account = page.session.account
        form = page.form
        current = await self._current_rules(account)
        text = form.get("forward", "").strip()
        forward = ""
        if text:
            try:
                target = parse_address(text, utf8=True)
            except AddressError as exc:
                return await self.show(page, 400, error=f"{text}: {exc}")
            if str(target).lower() == str(account).lower():
                return await self.show(page, 400, error="Mail cannot be forwarded to itself.")
            forward = str(target)
        changed = dataclasses.replace(current, forward=forward, keep_copy=form.get("keep") == "on")
        done = f"Mail is forwarded to {forward}." if forward else "Mail is not forwarded."
        return await self._save_rules(page, changed, done)

    async def _save_rules(
        self, page: Page, rules: rules_module.AccountRules, done: str
    ) -> Response:
        account = page.session.account
        if rules.empty:
            await self.web.blocking(self._rules_off, account)
            return await self.show(page, notice=done)
        data = rules_module.script(rules)
        return await self._store(page, rules_module.SCRIPT_NAME, data, done)

    def _rules_off(self, account: Address) -> None:
        if self.scripts.active_name(account) == rules_module.SCRIPT_NAME:
            self.scripts.activate(account, None)

    async def sieve(self, page: Page) -> Response:
        text = page.form.get("script", "")
        account = page.session.account
        name = await self.web.blocking(self.scripts.active_name, account)
        if name in (None, rules_module.SCRIPT_NAME):
            name = DEFAULT_SCRIPT
        return await self._store(page, name, text.replace("\r\n", "\n").encode("utf-8"))

    async def _store(self, page: Page, name: str, data: bytes, done: str = "") -> Response:
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
        return await self.show(page, notice=done or f"Script {name!r} saved and active.")

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
    routes.add("/account/app-passwords", web.guarded(pages.app_password), ("POST",), max_body=small)
    routes.add("/account/forwarding", web.guarded(pages.forwarding), ("POST",), max_body=small)
