"""The admin and account web pages over real HTTPS (issue 18).

One server with [listen] https; alice is flagged admin with the real CLI
(`postoffice user admin`), bob and carol are plain users.  Pages are
fetched as a browser would (tests/support/web.py): cookies kept, each
form's CSRF token read from the page.  The hostile tests are here too:
unauthenticated access, CSRF without, with a wrong token and from another
origin, session fixation, brute force (throttled, and the throttle is the
mail protocols' own), path traversal in /static, and markup in values the
pages show (an alias target, a HELO name in a trace) rendered escaped.
"""

from __future__ import annotations

import base64
import html
import poplib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dns import auth_dns
from tests.support.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    raw,
    submission,
    tls_context,
    wait_for,
)
from tests.support.ports import free_port
from tests.support.server import PostofficeServer
from tests.support.web import LOGIN, SESSION, Answer, Browser

CAROL, CAROL_PW = "carol@example.test", "carol-password-3"
DAVE, DAVE_PW = "dave@example.test", "dave-password-4"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    root = tmp_path_factory.mktemp("web")
    https = free_port(("127.0.0.1",))
    # The DNS health page's zone: an MX and the host's address, nothing else.
    dns = auth_dns(
        root,
        mx=[("example.test", "mail.example.test", 10)],
        hosts={"mail.example.test": ["127.0.0.1"]},
    ).start()
    server = PostofficeServer(
        root,
        sections={
            "listen": {"https": [f"127.0.0.1:{https}"]},
            "log": {"file": str(root / "mail.log")},
            # Remote mail waits in the queue: the smarthost never answers.
            "relay": {
                "smarthost": f"127.0.0.1:{free_port()}",
                "retry_schedule": [3600],
                "dns_servers": [dns.server],
            },
            # carol's account budget is 3 failures; the address budget is off
            # so that the other tests' wrong passwords do not add up.
            "auth": {
                "throttle_account_failures": 3,
                "throttle_address_failures": 0,
                "throttle_max_delay": 2.0,
                "allow_plaintext_loopback": True,
            },
        },
    )
    server.ports["https"] = https
    for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW), (CAROL, CAROL_PW), (DAVE, DAVE_PW)):
        server.add_user(user, password)
    server.cli("user", "admin", ALICE)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        dns.stop()


def browser(srv: PostofficeServer) -> Browser:
    return Browser(srv.ports["https"])


def logged_in(srv: PostofficeServer, user: str, password: str) -> Browser:
    b = browser(srv)
    answer = b.login(user, password)
    assert answer.status == 303, answer.body
    return b


def pop3_login(srv: PostofficeServer, user: str, password: str) -> bool:
    pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=tls_context(), timeout=20)
    try:
        pop.user(user)
        pop.pass_(password)
        return True
    except poplib.error_proto:
        return False
    finally:
        pop.close()


# --- access ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/account", "/admin", "/admin/queue", "/admin/trace?id=x"])
def test_pages_without_a_session_send_to_the_login(srv: PostofficeServer, path: str) -> None:
    answer = browser(srv).get(path)
    assert answer.status == 303
    assert answer.headers["location"] in ("/login", "/account")


@pytest.mark.abuse
@pytest.mark.parametrize(
    "path", ["/account/password", "/account/sieve", "/admin/accounts", "/logout"]
)
def test_a_post_without_a_session_is_refused(srv: PostofficeServer, path: str) -> None:
    answer = browser(srv).post(
        path, {"csrf": "x", "what": "domain", "action": "add", "name": "evil.test"}
    )
    assert answer.status == 403
    assert "evil.test" not in srv.cli("domain", "list").stdout


def test_login_sets_a_strict_session_cookie_and_security_headers(srv: PostofficeServer) -> None:
    b = browser(srv)
    form = b.get("/login")
    assert form.status == 200
    csp = form.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src" not in csp and "unsafe-inline" not in csp  # no script at all
    assert form.headers["x-frame-options"] == "DENY"
    assert form.headers["x-content-type-options"] == "nosniff"
    assert form.headers["referrer-policy"] == "same-origin"
    assert "<script" not in form.body and "style=" not in form.body
    answer = b.post("/login", {"csrf": form.csrf, "username": BOB, "password": BOB_PW})
    assert answer.status == 303 and answer.headers["location"] == "/account"
    (cookie,) = [c for c in answer.set_cookies if c.startswith(SESSION + "=")]
    flags = {part.strip() for part in cookie.split(";")[1:]}
    assert {"Secure", "HttpOnly", "SameSite=Strict", "Path=/"} <= flags
    assert not any(f.lower().startswith("domain") for f in flags)
    assert len(b.cookies[SESSION]) >= 40  # 256 random bits
    page = b.get("/account")
    assert page.status == 200 and BOB in page.body
    assert page.headers["content-security-policy"] == csp
    assert "Cache-Control" not in page.body and page.headers["cache-control"] == "no-store"


@pytest.mark.abuse
def test_session_fixation_a_planted_id_is_never_the_logged_in_one(srv: PostofficeServer) -> None:
    b = browser(srv)
    planted = "attacker-chosen-session-id-0123456789abcdef"
    b.cookies[SESSION] = planted
    assert b.login(BOB, BOB_PW).status == 303
    assert b.cookies[SESSION] != planted
    attacker = browser(srv)
    attacker.cookies[SESSION] = planted
    assert attacker.get("/account").status == 303  # to the login: the planted id is nobody


@pytest.mark.abuse
def test_the_session_id_changes_at_every_login_and_logout_ends_it(srv: PostofficeServer) -> None:
    b = logged_in(srv, BOB, BOB_PW)
    first = b.cookies[SESSION]
    assert b.login(BOB, BOB_PW).status == 303
    second = b.cookies[SESSION]
    assert second != first
    old = browser(srv)
    old.cookies[SESSION] = first
    assert old.get("/account").status == 303  # the id before the login ended with it
    assert b.get("/account").status == 200
    assert b.form_post("/account", "/logout", {}).status == 303
    assert SESSION not in b.cookies
    again = browser(srv)
    again.cookies[SESSION] = second
    assert again.get("/account").status == 303


def test_a_wrong_password_shows_the_form_again(srv: PostofficeServer) -> None:
    b = browser(srv)
    answer = b.login(DAVE, "not-daves-password")
    assert answer.status == 403 and "Wrong name or password" in answer.body
    assert SESSION not in b.cookies


# --- CSRF ------------------------------------------------------------------------------
@pytest.mark.abuse
def test_csrf_a_post_without_or_with_a_wrong_token_or_origin_is_refused(
    srv: PostofficeServer,
) -> None:
    b = logged_in(srv, DAVE, DAVE_PW)
    change = {"current": DAVE_PW, "new": "stolen-password-9", "again": "stolen-password-9"}
    assert b.post("/account/password", change).status == 403
    assert b.post("/account/password", {**change, "csrf": "0" * 43}).status == 403
    token = b.get("/account").csrf
    other = logged_in(srv, BOB, BOB_PW).get("/account").csrf
    assert b.post("/account/password", {**change, "csrf": other}).status == 403  # bob's token
    evil = {"Origin": "https://evil.example"}
    assert b.post("/account/password", {**change, "csrf": token}, evil).status == 403
    assert b.post("/account/password", {**change, "csrf": token}, {"Origin": "null"}).status == 403
    # Not a form at all (a JSON or multipart body a page could send elsewhere).
    refused = b.request(
        "POST",
        "/account/password",
        b'{"csrf": "%s"}' % token.encode(),
        {"Content-Type": "application/json"},
    )
    assert refused.status == 400
    assert pop3_login(srv, DAVE, DAVE_PW)  # nothing changed
    # The login form's own token: bound to its pre-login cookie.
    login = browser(srv)
    form = login.get("/login")
    login.cookies.pop(LOGIN)
    assert (
        login.post("/login", {"csrf": form.csrf, "username": DAVE, "password": DAVE_PW}).status
        == 403
    )
    assert SESSION not in login.cookies


# --- brute force ------------------------------------------------------------------------
@pytest.mark.abuse
def test_brute_force_is_throttled_by_the_mail_protocols_throttle(srv: PostofficeServer) -> None:
    b = browser(srv)
    statuses = []
    started = time.monotonic()
    for n in range(6):
        statuses.append(b.login(CAROL, f"guess-{n}").status)
    assert statuses[:3] == [403, 403, 403]
    assert statuses[-1] == 429, statuses  # carol's budget of 3 is spent: refused unchecked
    assert time.monotonic() - started < 60
    # Refused, unchecked, even with the right password: the password may be right.
    answer = b.login(CAROL, CAROL_PW)
    assert answer.status == 429 and "try again later" in answer.body
    # The same throttle as SMTP AUTH: submission refuses carol too, "try later".
    client = raw(srv, "submission")
    try:
        assert client.cmd("STARTTLS")[0] == 220
        client.starttls()
        assert client.cmd("EHLO client.test")[0] == 250
        token = base64.b64encode(f"\0{CAROL}\0{CAROL_PW}".encode()).decode()
        assert client.cmd(f"AUTH PLAIN {token}")[0] == 454
    finally:
        client.close()


# --- static files ------------------------------------------------------------------------
def test_the_style_sheet_is_served(srv: PostofficeServer) -> None:
    answer = browser(srv).get("/static/style.css")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/css")
    assert "body" in answer.body


@pytest.mark.abuse
@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/../__init__.py",
        "/static/..%2f__init__.py",
        "/static/%2e%2e/%2e%2e/config/settings.py",
        "/static//etc/passwd",
        "/static/../templates/base.html",
        "/static/style.css/../../app.py",
        "/static/STYLE.CSS",
        "/static/style.css%00.html",
        "/static/..\\app.py",
    ],
)
def test_path_traversal_in_static_files_is_refused(srv: PostofficeServer, path: str) -> None:
    answer = browser(srv).get(path)
    assert answer.status in (400, 404)
    assert "import" not in answer.body and "root:" not in answer.body and "{%" not in answer.body


# --- admin --------------------------------------------------------------------------------
def test_admin_pages_are_for_admins_only(srv: PostofficeServer) -> None:
    b = logged_in(srv, BOB, BOB_PW)
    for path in ("/admin", "/admin/queue", "/admin/trace"):
        assert b.get(path).status == 403
    token = b.get("/account").csrf
    answer = b.post(
        "/admin/accounts", {"csrf": token, "what": "domain", "action": "add", "name": "bob.test"}
    )
    assert answer.status == 403
    assert "bob.test" not in srv.cli("domain", "list").stdout
    assert "/admin" not in b.get("/account").body  # no admin link either


def test_an_admin_adds_and_removes_a_domain_a_user_and_an_alias(srv: PostofficeServer) -> None:
    b = logged_in(srv, ALICE, ALICE_PW)
    page = b.get("/admin")
    assert page.status == 200 and BOB in page.body and "example.test" in page.body

    def change(fields: dict[str, str]) -> str:
        answer = b.form_post("/admin", "/admin/accounts", fields)
        assert answer.status == 200, answer.body
        return answer.body

    change({"what": "domain", "action": "add", "name": "Web.Example"})
    assert "web.example" in srv.cli("domain", "list").stdout
    change(
        {
            "what": "user",
            "action": "add",
            "address": "erin@web.example",
            "password": "erin-password-5",
        }
    )
    assert "erin@web.example" in srv.cli("user", "list").stdout
    assert pop3_login(srv, "erin@web.example", "erin-password-5")
    assert srv.maildir("erin@web.example").is_dir()
    change(
        {
            "what": "alias",
            "action": "add",
            "alias": "team@web.example",
            "targets": "erin@web.example, bob@example.test",
        }
    )
    assert (
        "team@web.example -> erin@web.example, bob@example.test" in srv.cli("alias", "list").stdout
    )
    # The CLI's refusals, in the CLI's words.
    refused = b.form_post(
        "/admin",
        "/admin/accounts",
        {"what": "user", "action": "remove", "address": "erin@web.example"},
    )
    assert refused.status == 400 and "is a target of the alias(es) team@web.example" in refused.body
    weak = b.form_post(
        "/admin",
        "/admin/accounts",
        {"what": "user", "action": "add", "address": "fay@web.example", "password": "fay"},
    )
    assert weak.status == 400 and "refusing a weak password" in weak.body
    search = b.get("/admin?q=erin")
    assert (
        "erin@web.example" in search.body
        and BOB not in search.body.split("Users")[1].split("Aliases")[0]
    )
    change({"what": "alias", "action": "remove", "alias": "team@web.example"})
    change({"what": "user", "action": "remove", "address": "erin@web.example"})
    change({"what": "domain", "action": "remove", "name": "web.example"})
    assert "web.example" not in srv.cli("domain", "list").stdout
    assert "erin@" not in srv.cli("user", "list").stdout


@pytest.mark.abuse
def test_markup_in_an_alias_target_is_shown_escaped(srv: PostofficeServer) -> None:
    b = logged_in(srv, ALICE, ALICE_PW)
    hostile = '"<script>alert(1)</script>"@evil.example'
    answer = b.form_post(
        "/admin",
        "/admin/accounts",
        {"what": "alias", "action": "add", "alias": "xss@example.test", "targets": hostile},
    )
    assert answer.status == 200, answer.body
    page = b.get("/admin")
    assert "<script>alert(1)</script>" not in page.body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.body
    b.form_post(
        "/admin",
        "/admin/accounts",
        {"what": "alias", "action": "remove", "alias": "xss@example.test"},
    )


def test_the_queue_and_a_trace_with_markup_in_the_helo_name(srv: PostofficeServer) -> None:
    hostile = "<img-src=x-onerror=alert(1)>"
    client = submission(srv, BOB, BOB_PW)
    try:
        assert client.cmd(f"EHLO {hostile}")[0] == 250
        assert client.cmd("MAIL FROM:<bob@example.test>")[0] == 250
        assert client.cmd("RCPT TO:<someone@remote.example>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(
            b"Subject: =?utf-8?q?=3Cscript=3Ealert(2)=3C/script=3E_caf=C3=A9?=\r\n"
            b'From: "<img src=x onerror=alert(3)>" <bob@example.test>\r\n'
            b"\r\nqueued\r\n.\r\n"
        )
        assert client.reply()[0] == 250
    finally:
        client.close()
    b = logged_in(srv, ALICE, ALICE_PW)
    assert wait_for(lambda: "someone@remote.example" in b.get("/admin/queue").body)
    queue = b.get("/admin/queue")
    queue_id = re.search(r"/admin/trace\?id=([A-Za-z0-9-]+)", queue.body).group(1)  # type: ignore[union-attr]
    assert wait_for(lambda: "received" in b.get(f"/admin/trace?id={queue_id}").body)
    trace = b.get(f"/admin/trace?id={queue_id}")
    assert trace.status == 200
    assert hostile not in trace.body and "&lt;img-src=x-onerror=alert(1)&gt;" in trace.body
    # Inspecting the queued message: its Subject (RFC 2047 decoded) and the
    # From display name are shown, as text.
    queued = trace.body.split('id="queued-h"')[1].split("</section>")[0]
    assert "<script>" not in queued and "<img src" not in queued
    assert "&lt;script&gt;alert(2)&lt;/script&gt; café" in queued, queued
    assert "&lt;img src=x onerror=alert(3)&gt;" in queued, queued
    flushed = b.form_post("/admin/queue", "/admin/queue/change", {"action": "flush"})
    assert flushed.status == 200 and "flush requested" in flushed.body
    removed = b.form_post(
        "/admin/queue", "/admin/queue/change", {"action": "remove", "id": queue_id}
    )
    assert removed.status == 200, removed.body
    assert wait_for(lambda: queue_id not in b.get("/admin/queue").body)
    bad = b.form_post(
        "/admin/queue", "/admin/queue/change", {"action": "remove", "id": "../../etc"}
    )
    assert bad.status == 400


def test_user_admin_off_takes_effect_at_the_next_request(srv: PostofficeServer) -> None:
    srv.cli("user", "admin", DAVE)
    b = logged_in(srv, DAVE, DAVE_PW)
    assert b.get("/admin").status == 200
    srv.cli("user", "admin", DAVE, "--off")
    assert wait_for(lambda: b.get("/admin").status == 403, timeout=10)


# --- account -------------------------------------------------------------------------------
def test_a_user_changes_the_password_through_the_clis_rules(srv: PostofficeServer) -> None:
    b = logged_in(srv, BOB, BOB_PW)
    other = logged_in(srv, BOB, BOB_PW)  # another browser: logged out by the change
    before = b.cookies[SESSION]
    wrong = b.form_post(
        "/account",
        "/account/password",
        {"current": "nope-nope-1", "new": "x" * 12, "again": "x" * 12},
    )
    assert wrong.status == 403
    weak = b.form_post(
        "/account", "/account/password", {"current": BOB_PW, "new": "bob", "again": "bob"}
    )
    assert weak.status == 400 and "weak password" in weak.body
    new = "bob-new-password-7"
    done = b.form_post(
        "/account", "/account/password", {"current": BOB_PW, "new": new, "again": new}
    )
    assert done.status == 200 and "password was changed" in done.body
    assert b.cookies[SESSION] != before
    assert b.get("/account").status == 200
    assert other.get("/account").status == 303
    assert pop3_login(srv, BOB, new) and not pop3_login(srv, BOB, BOB_PW)
    srv.cli("user", "passwd", BOB, "--password-stdin", input=BOB_PW + "\n")


def test_the_sieve_editor_refuses_a_broken_script_and_stores_a_good_one(
    srv: PostofficeServer,
) -> None:
    b = logged_in(srv, DAVE, DAVE_PW)
    broken = b.form_post(
        "/account", "/account/sieve", {"script": 'require ["fileinto"];\nfileinto "x"\nstop;'}
    )
    assert broken.status == 400 and "line 2, column 1: fileinto" in broken.body
    good = 'require ["fileinto"];\nif header :contains "subject" "<list>" { fileinto "Lists"; }\n'
    stored = b.form_post("/account", "/account/sieve", {"script": good})
    assert stored.status == 200, stored.body
    assert "&lt;list&gt;" in stored.body and '"<list>"' not in stored.body
    script = srv.data_dir / "sieve" / "example.test" / "dave" / "default.sieve"
    assert script.read_text() == good


def test_a_vacation_reply_set_on_the_page_answers_mail(srv: PostofficeServer) -> None:
    b = logged_in(srv, DAVE, DAVE_PW)
    answer = b.form_post(
        "/account",
        "/account/vacation",
        {
            "enabled": "on",
            "days": "3",
            "subject": 'Away "now"',
            "reason": "I am away.\r\nBack on Monday.",
        },
    )
    assert answer.status == 200, answer.body
    assert "It is <strong>on</strong>" in answer.body
    before = len(srv.messages(ALICE))
    client = submission(srv, ALICE, ALICE_PW)
    try:
        assert client.cmd("MAIL FROM:<alice@example.test>")[0] == 250
        assert client.cmd("RCPT TO:<dave@example.test>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(
            b"Subject: hello\r\nFrom: alice@example.test\r\nTo: dave@example.test\r\nMessage-ID: <v1@example.test>\r\n\r\nhi\r\n.\r\n"
        )
        assert client.reply()[0] == 250
    finally:
        client.close()
    assert wait_for(lambda: len(srv.messages(ALICE)) > before)
    reply = srv.messages(ALICE)[-1].read_bytes()
    assert b'Subject: Away "now"' in reply and b"Back on Monday." in reply
    off = b.form_post("/account", "/account/vacation", {"days": "3"})
    assert off.status == 200 and "It is off" in off.body
    bad = b.form_post(
        "/account", "/account/vacation", {"enabled": "on", "days": "0", "reason": "x"}
    )
    assert bad.status == 400


def test_quota_usage_is_shown(srv: PostofficeServer) -> None:
    srv.cli("user", "quota", BOB, "10M")
    page = logged_in(srv, BOB, BOB_PW).get("/account")
    assert "quota: 10" in page.body and "% used" in page.body
    srv.cli("user", "quota", BOB, "default")


# --- admin_networks ------------------------------------------------------------------------
def test_admin_networks_close_the_admin_pages_to_other_clients(tmp_path: Path) -> None:
    https = free_port(("127.0.0.1",))
    server = PostofficeServer(
        tmp_path,
        sections={
            "listen": {"https": [f"127.0.0.1:{https}"]},
            "web": {"admin_networks": ["192.0.2.0/24"]},
        },
    )
    server.ports["https"] = https
    server.add_user(ALICE, ALICE_PW)
    server.cli("user", "admin", ALICE)
    server.start()
    try:
        b = logged_in(server, ALICE, ALICE_PW)
        assert b.get("/account").status == 200
        closed = b.get("/admin")
        assert closed.status == 403 and "not open to your network" in closed.body
        assert browser(server).get("/admin").status == 403  # not even the login's state shown
        # A reload opens them (the list is read at each request).
        text = server.config.read_text().replace(
            'admin_networks = ["192.0.2.0/24"]', "admin_networks = []"
        )
        server.config.write_text(text)
        server.cli("reload")
        assert wait_for(lambda: b.get("/admin").status == 200, timeout=10)
    finally:
        server.stop()


def test_the_dashboard_plots_the_traffic_the_test_sent(srv: PostofficeServer) -> None:
    b = logged_in(srv, ALICE, ALICE_PW)

    def received_this_hour() -> int:
        page = b.get("/admin")
        assert page.status == 200
        assert '<svg width="480"' in page.body and 'data-series="received"' in page.body
        return int(re.findall(r"received: (\d+)</title>", page.body)[-1])

    before = received_this_hour()
    for n in range(2):
        client = submission(srv, BOB, BOB_PW)
        try:
            assert client.cmd("MAIL FROM:<bob@example.test>")[0] == 250
            assert client.cmd("RCPT TO:<alice@example.test>")[0] == 250
            assert client.cmd("DATA")[0] == 354
            client.send(f"Subject: plot {n}\r\nFrom: bob@example.test\r\n\r\nx\r\n.\r\n".encode())
            assert client.reply()[0] == 250
        finally:
            client.close()
    # Views within a second reuse the last sample: wait for the next one.
    assert wait_for(lambda: received_this_hour() == before + 2, timeout=10, step=0.5)


def test_user_admin_refuses_an_unknown_user(srv: PostofficeServer) -> None:
    done = srv.cli("user", "admin", "nobody@example.test", check=False)
    assert done.returncode == 1 and "no such user: nobody@example.test" in done.stderr
    listed = srv.cli("user", "admin", BOB, "--off")
    assert "is no longer an admin" in listed.stdout


def test_the_dns_health_page_says_what_the_doctor_says(srv: PostofficeServer) -> None:
    b = logged_in(srv, ALICE, ALICE_PW)
    listing = b.get("/admin/dns")
    assert listing.status == 200 and "/admin/dns?domain=example.test" in listing.body
    # The certificate's status, as `postoffice cert status` prints it.
    cert = listing.body.split('id="cert-h"')[1].split("</section>")[0]
    printed = srv.cli("cert", "status").stdout
    names = re.search(r"names\s+(.*)", printed)
    issuer = re.search(r"issuer\s+(.*)", printed)
    assert names is not None and issuer is not None, printed
    assert f"<dd>{html.escape(names[1].strip())}</dd>" in cert, cert
    assert f"<dd>{html.escape(issuer[1].strip())}</dd>" in cert, cert
    assert "<dt>Next renewal</dt><dd>by hand (no [acme] in the config)</dd>" in cert
    page = b.get("/admin/dns?domain=example.test")
    assert page.status == 200, page.body
    found = re.findall(r'<tr class="status-(\w+)"><td>\w+</td><td><code>([^<]*)</code>', page.body)
    statuses = {html.unescape(record): status for status, record in found}
    assert statuses["example.test. IN MX 10 mail.example.test."] == "ok", statuses
    assert statuses['example.test. IN TXT "v=spf1 mx -all"'] == "missing"
    assert "problem(s)" in page.body
    records = html.unescape(page.body.split('<pre class="records">')[1].split("</pre>")[0])
    assert "example.test. IN MX 10 mail.example.test." in records
    assert "_dmarc.example.test." in records
    hostile = b.get("/admin/dns?domain=%3Cscript%3Eevil.test")
    assert hostile.status == 404 and "<script>" not in hostile.body
    assert b.get("/admin/dns?domain=elsewhere.test").status == 404


def test_recent_logins_show_every_protocol_with_the_address(srv: PostofficeServer) -> None:
    assert pop3_login(srv, DAVE, DAVE_PW)
    page = logged_in(srv, DAVE, DAVE_PW).get("/account")
    logins = page.body.split('id="logins-h"')[1].split("</table>")[0]
    assert "<td>web</td><td>127.0.0.1</td>" in logins
    assert "<td>pop3</td><td>127.0.0.1</td>" in logins
    assert logins.index("<td>web</td>") < logins.index("<td>pop3</td>")  # newest first


@pytest.mark.abuse
def test_a_password_changed_by_the_cli_or_a_removed_user_ends_the_session(
    srv: PostofficeServer,
) -> None:
    srv.add_user("hank@example.test", "hank-password-10")
    b = logged_in(srv, "hank@example.test", "hank-password-10")
    assert b.get("/account").status == 200
    srv.cli("user", "passwd", "hank@example.test", "--password-stdin", input="hank-password-11\n")
    assert wait_for(lambda: b.get("/account").status == 303, timeout=10)  # to the login
    b = logged_in(srv, "hank@example.test", "hank-password-11")
    srv.cli("user", "remove", "hank@example.test")
    assert wait_for(lambda: b.get("/account").status == 303, timeout=10)


def send_to(srv: PostofficeServer, recipient: str, subject: str) -> None:
    client = submission(srv, ALICE, ALICE_PW)
    try:
        assert client.cmd("MAIL FROM:<alice@example.test>")[0] == 250
        assert client.cmd(f"RCPT TO:<{recipient}>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(
            f"Subject: {subject}\r\nFrom: alice@example.test\r\nTo: {recipient}\r\n"
            f"Message-ID: <{subject}@example.test>\r\n\r\nhi\r\n.\r\n".encode()
        )
        assert client.reply()[0] == 250
    finally:
        client.close()


def test_forwarding_and_a_vacation_reply_live_in_one_script(srv: PostofficeServer) -> None:
    srv.add_user("ivy@example.test", "ivy-password-12")
    b = logged_in(srv, "ivy@example.test", "ivy-password-12")
    for bad, why in (("ivy@example.test", "forwarded to itself"), ("not an address", "")):
        refused = b.form_post("/account", "/account/forwarding", {"forward": bad, "keep": "on"})
        assert refused.status == 400 and why in refused.body
    done = b.form_post("/account", "/account/forwarding", {"forward": BOB, "keep": "on"})
    assert done.status == 200 and f"Mail is forwarded to {BOB}" in done.body
    vacation = {"enabled": "on", "days": "5", "subject": "Gone", "reason": "Gone fishing."}
    assert b.form_post("/account", "/account/vacation", vacation).status == 200
    page = b.get("/account")
    assert f'value="{BOB}"' in page.body and 'value="Gone"' in page.body  # read back
    bob_before, ivy_before = len(srv.messages(BOB)), len(srv.messages("ivy@example.test"))
    alice_before = len(srv.messages(ALICE))
    send_to(srv, "ivy@example.test", "forwarded-1")
    assert wait_for(lambda: len(srv.messages(BOB)) > bob_before)
    assert wait_for(lambda: len(srv.messages("ivy@example.test")) > ivy_before)  # kept
    assert wait_for(lambda: len(srv.messages(ALICE)) > alice_before)  # the vacation reply
    assert b"Gone fishing." in srv.messages(ALICE)[-1].read_bytes()
    # Forwarding off leaves the vacation reply on; both off: no active script.
    b.form_post("/account", "/account/forwarding", {"forward": ""})
    page = b.get("/account")
    assert "Mail is not forwarded" in page.body and "It is <strong>on</strong>" in page.body
    b.form_post("/account", "/account/vacation", {})
    assert not (srv.data_dir / "sieve" / "example.test" / "ivy" / ".active").exists()


def test_dkim_keys_are_made_and_rotated_from_the_dns_page(srv: PostofficeServer) -> None:
    b = logged_in(srv, ALICE, ALICE_PW)
    page = b.get("/admin/dns?domain=example.test")
    assert "has no DKIM keys" in page.body
    made = b.form_post(
        "/admin/dns?domain=example.test",
        "/admin/dns/dkim",
        {"domain": "example.test", "action": "generate"},
    )
    assert made.status == 200 and "made DKIM keys for example.test" in made.body
    shown = srv.cli("dkim", "show", "example.test").stdout  # what the CLI sees
    first = re.findall(r"^(\S+)\._domainkey\.example\.test\.", shown, re.M)
    assert first and all(f"{s}._domainkey.example.test." in html.unescape(made.body) for s in first)
    again = b.form_post(
        "/admin/dns?domain=example.test",
        "/admin/dns/dkim",
        {"domain": "example.test", "action": "generate"},
    )
    assert again.status == 400 and "has DKIM keys already" in again.body
    rotated = b.form_post(
        "/admin/dns?domain=example.test",
        "/admin/dns/dkim",
        {"domain": "example.test", "action": "rotate"},
    )
    assert rotated.status == 200
    now = re.findall(
        r"^(\S+)\._domainkey\.example\.test\.", srv.cli("dkim", "show", "example.test").stdout, re.M
    )
    assert now and set(now).isdisjoint(first)
    elsewhere = b.form_post(
        "/admin/dns", "/admin/dns/dkim", {"domain": "elsewhere.test", "action": "generate"}
    )
    assert elsewhere.status == 404
    assert not (srv.data_dir / "dkim" / "elsewhere.test").exists()


def smtp_auth_works(srv: PostofficeServer, user: str, password: str) -> bool:
    client = raw(srv, "submission")
    try:
        assert client.cmd("STARTTLS")[0] == 220
        client.starttls()
        assert client.cmd("EHLO client.test")[0] == 250
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return client.cmd(f"AUTH PLAIN {token}")[0] == 235
    finally:
        client.close()


def test_an_app_password_logs_a_client_in_until_it_is_revoked(srv: PostofficeServer) -> None:
    user, password = "jill@example.test", "jill-password-13"
    srv.add_user(user, password)
    b = logged_in(srv, user, password)
    made = b.form_post(
        "/account", "/account/app-passwords", {"action": "add", "label": "<b>phone</b>"}
    )
    assert made.status == 200, made.body
    secret = re.search(r'<code class="secret">([a-z2-9-]{19})</code>', made.body).group(1)  # type: ignore[union-attr]
    assert "&lt;b&gt;phone&lt;/b&gt;" in made.body and "<b>phone</b>" not in made.body
    assert secret not in b.get("/account").body  # shown once
    assert pop3_login(srv, user, secret)
    assert pop3_login(srv, user, secret.replace("-", "").upper())  # as typed on a phone
    assert smtp_auth_works(srv, user, secret)
    assert pop3_login(srv, user, password)  # the account password still works
    assert not pop3_login(srv, BOB, secret)  # it is jill's, nobody else's
    # Not for the web pages: a stolen phone's password cannot take the account.
    assert browser(srv).login(user, secret).status == 403
    change = {"current": secret, "new": "stolen-password-14", "again": "stolen-password-14"}
    assert b.form_post("/account", "/account/password", change).status == 403
    assert pop3_login(srv, user, password)
    (password_id,) = re.findall(r'name="id" value="([0-9a-f]+)"', b.get("/account").body)
    revoked = b.form_post(
        "/account", "/account/app-passwords", {"action": "remove", "id": password_id}
    )
    assert revoked.status == 200 and "revoked" in revoked.body
    assert not pop3_login(srv, user, secret)
    assert pop3_login(srv, user, password)
    other = b.form_post("/account", "/account/app-passwords", {"action": "remove", "id": "0" * 16})
    assert other.status == 400


def test_an_admin_sets_a_quota_as_user_quota_does(srv: PostofficeServer) -> None:
    b = logged_in(srv, ALICE, ALICE_PW)

    def set_quota(size: str) -> Answer:
        return b.form_post(
            "/admin",
            "/admin/accounts",
            {"what": "user", "action": "quota", "address": DAVE, "size": size},
        )

    done = set_quota("2G")
    assert done.status == 200 and f"set the quota of {DAVE}: 2 GiB" in done.body
    assert "quota 2147483648 bytes" in srv.cli("user", "quota", DAVE).stdout
    assert 'value="2147483648"' in done.body  # the form shows what it takes back
    bad = set_quota("lots")
    assert bad.status == 400 and "is not a size" in bad.body
    assert set_quota("none").status == 200
    assert "no quota (its own)" in srv.cli("user", "quota", DAVE).stdout
    assert set_quota("default").status == 200
    assert "the default" in srv.cli("user", "quota", DAVE).stdout
