"""A small browser-like HTTPS client for the web pages: real TLS to the
server's [listen] https, cookies kept as a browser keeps them (by name),
the forms' CSRF token read from the page as a browser would submit it."""

from __future__ import annotations

import html
import http.client
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field

SESSION = "__Host-postoffice-session"
LOGIN = "__Host-postoffice-login"
_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    set_cookies: list[str]
    body: str

    @property
    def csrf(self) -> str:
        found = _CSRF.search(self.body)
        assert found, self.body[:2000]
        return html.unescape(found.group(1))


@dataclass
class Browser:
    port: int
    host: str = "mail.example.test"
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the test server's self-signed certificate
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=30)
        sent = {"Host": f"{self.host}:{self.port}", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            set_cookies = response.msg.get_all("Set-Cookie") or []
            answer = Answer(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                set_cookies,
                response.read().decode("utf-8", "replace"),
            )
        finally:
            conn.close()
        for line in set_cookies:
            name, _sep, rest = line.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in line:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return answer

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(
        self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None
    ) -> Answer:
        body = urllib.parse.urlencode(fields).encode()
        return self.request(
            "POST",
            path,
            body,
            {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )

    def login(self, user: str, password: str) -> Answer:
        form = self.get("/login")
        assert form.status == 200, form.body
        return self.post("/login", {"csrf": form.csrf, "username": user, "password": password})

    def form_post(self, page: str, action: str, fields: dict[str, str]) -> Answer:
        """Submit a form of ``page`` as the browser would: with the page's token."""
        token = self.get(page).csrf
        return self.post(action, {"csrf": token, **fields})
