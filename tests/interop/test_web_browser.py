"""The web pages in a real browser: Debian's Chromium, driven by Playwright.

An admin logs in through the form, adds a domain and a user, reads the
dashboard's plots, retries the queue and opens a message's trace; a user
logs in, changes the password and sets a vacation reply, and a message to
them gets the reply.  Each page is screenshotted (kept in the test's
directory, and copied to $POSTOFFICE_SCREENSHOTS when set), checked for
CSP violations in the console (there must be none: the pages run no script
and have no inline style) and for the accessibility basics the pages
promise: landmarks, a label for every field, a name for every button.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dns import auth_dns
from tests.support.helpers import ALICE, ALICE_PW, BOB, BOB_PW, submission, wait_for
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    root = tmp_path_factory.mktemp("browser")
    https = free_port(("127.0.0.1",))
    # Every lookup (the DNS health page's) goes to this test's own DNS server.
    dns = auth_dns(
        root,
        mx=[("browser.example", "mail.example.test", 10)],
        hosts={"mail.example.test": ["127.0.0.1"]},
    ).start()
    server = PostofficeServer(
        root,
        sections={
            "listen": {"https": [f"127.0.0.1:{https}"]},
            "log": {"file": str(root / "mail.log")},
            "relay": {
                "smarthost": f"127.0.0.1:{free_port()}",
                "retry_schedule": [3600],
                "dns_servers": [dns.server],
            },
        },
    )
    server.ports["https"] = https
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, BOB_PW)
    server.cli("user", "admin", ALICE)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        dns.stop()


@pytest.fixture
def browser(require_program: Any) -> Iterator[Any]:
    chromium = require_program("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # the [test] extra has it: in CI its absence is a failure
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright is not installed")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class Visit:
    """One browser context (its own cookies), with the checks every page gets."""

    def __init__(self, browser: Any, srv: PostofficeServer, shots: Path) -> None:
        self.base = f"https://127.0.0.1:{srv.ports['https']}"
        self.context = browser.new_context(ignore_https_errors=True)  # the self-signed test cert
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text))
        self.shots = shots

    def go(self, path: str) -> None:
        self.page.goto(self.base + path)

    def check(self, name: str) -> None:
        """Screenshot, no CSP violations, and the accessibility basics."""
        page = self.page
        self.shots.mkdir(exist_ok=True)
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)
        violations = [m for m in self.console if "Content Security Policy" in m]
        assert not violations, violations
        assert page.locator("main").count() == 1
        assert page.locator("h1").count() == 1
        assert page.locator("html").get_attribute("lang") == "en"
        fields = page.locator("input:not([type=hidden]), textarea, select")
        for i in range(fields.count()):
            field_id = fields.nth(i).get_attribute("id")
            assert field_id and page.locator(f'label[for="{field_id}"]').count() == 1, field_id
        buttons = page.get_by_role("button")
        for i in range(buttons.count()):
            button = buttons.nth(i)
            assert (button.get_attribute("aria-label") or button.inner_text()).strip()
        # The accessibility tree Chromium builds names the main landmark.
        assert "- main" in page.locator("body").aria_snapshot()

    def login(self, user: str, password: str) -> None:
        self.go("/login")
        self.check("login")
        self.page.get_by_label("Address").fill(user)
        self.page.get_by_label("Password").fill(password)
        self.page.get_by_role("button", name="Log in").click()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "screenshots"
    yield folder
    keep = os.environ.get("POSTOFFICE_SCREENSHOTS")
    if keep and folder.is_dir():
        shutil.copytree(folder, Path(keep), dirs_exist_ok=True)


def test_an_admin_manages_accounts_reads_the_dashboard_and_traces_a_message(
    srv: PostofficeServer, browser: Any, shots: Path
) -> None:
    client = submission(srv, BOB, BOB_PW)
    try:
        assert client.cmd("MAIL FROM:<bob@example.test>")[0] == 250
        assert client.cmd("RCPT TO:<someone@remote.example>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: for the trace\r\nFrom: bob@example.test\r\n\r\nx\r\n.\r\n")
        assert client.reply()[0] == 250
    finally:
        client.close()
    visit = Visit(browser, srv, shots)
    page = visit.page
    try:
        visit.login(ALICE, ALICE_PW)
        page.wait_for_url("**/admin")
        visit.check("admin")
        # The dashboard: six plots, one with the message received.
        assert page.locator("svg[data-series]").count() == 6
        received = page.locator('svg[data-series="received"] title').all_text_contents()
        assert any(t.endswith("received: 1") for t in received), received
        page.get_by_label("New domain").fill("browser.example")
        page.get_by_role("button", name="Add domain").click()
        assert "added domain browser.example" in page.get_by_role("status").inner_text()
        page.get_by_label("New user's address").fill("gail@browser.example")
        page.locator("#user-password").fill("gail-password-6")
        page.get_by_role("button", name="Add user").click()
        assert "added user gail@browser.example" in page.get_by_role("status").inner_text()
        visit.check("admin-added")
        assert "gail@browser.example" in srv.cli("user", "list").stdout
        page.get_by_role("link", name="Queue", exact=True).click()
        page.wait_for_url("**/admin/queue")
        visit.check("queue")
        page.get_by_role("button", name="Retry every message now").click()
        assert "flush requested" in page.get_by_role("status").inner_text()
        page.locator("a[href^='/admin/trace?id=']").first.click()
        page.wait_for_url("**/admin/trace?id=*")
        assert wait_for(
            lambda: page.reload() is not None and "received" in page.locator("main").inner_text(),
            timeout=15,
            step=0.5,
        )
        visit.check("trace")
        assert "someone@remote.example" in page.locator(".timeline").inner_text()
        page.get_by_role("link", name="DNS health").click()
        page.get_by_role("link", name="browser.example").click()
        page.wait_for_url("**/admin/dns?domain=browser.example")
        visit.check("dns")
        records = page.locator("pre.records").inner_text()
        assert "browser.example. IN MX 10 mail.example.test." in records
        mx = page.locator("tr", has_text="browser.example. IN MX 10 mail.example.test.")
        assert mx.locator("td").first.inner_text() == "ok"  # found in the test's DNS
    finally:
        visit.close()


def test_a_user_changes_the_password_and_sets_a_vacation_reply(
    srv: PostofficeServer, browser: Any, shots: Path
) -> None:
    visit = Visit(browser, srv, shots)
    page = visit.page
    new_password = "bob-browser-password-8"
    try:
        visit.login(BOB, BOB_PW)
        page.wait_for_url("**/account")
        visit.check("account")
        assert page.get_by_role("link", name="Admin").count() == 0
        page.get_by_label("Current password").fill(BOB_PW)
        page.get_by_label("New password", exact=True).fill(new_password)
        page.get_by_label("New password again").fill(new_password)
        page.get_by_role("button", name="Change password").click()
        assert "password was changed" in page.get_by_role("status").inner_text()
        page.get_by_label("Reply to senders while I am away").check()
        page.get_by_label("Subject").fill("Out of office")
        page.get_by_label("Message").fill("Away until Monday.")
        page.get_by_role("button", name="Save vacation reply").click()
        assert "vacation reply is on" in page.get_by_role("status").inner_text()
        visit.check("account-vacation")
    finally:
        visit.close()
    before = len(srv.messages(ALICE))
    client = submission(srv, ALICE, ALICE_PW)
    try:
        assert client.cmd("MAIL FROM:<alice@example.test>")[0] == 250
        assert client.cmd("RCPT TO:<bob@example.test>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(
            b"Subject: hi bob\r\nFrom: alice@example.test\r\nTo: bob@example.test\r\n"
            b"Message-ID: <browser@example.test>\r\n\r\nhello\r\n.\r\n"
        )
        assert client.reply()[0] == 250
    finally:
        client.close()
    assert wait_for(lambda: len(srv.messages(ALICE)) > before)
    reply = srv.messages(ALICE)[-1].read_bytes()
    assert b"Subject: Out of office" in reply and b"Away until Monday." in reply
    # The new password is the mail password too.
    submission(srv, BOB, new_password).close()
