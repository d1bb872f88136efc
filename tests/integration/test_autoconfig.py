"""Client autoconfiguration on [listen] https, fetched over real TLS.

curl (verifying the test CA's certificate for autoconfig.example.test, with
--resolve) and Python's own HTTPS client fetch each document; each is read
the way its client reads it (Thunderbird's clientConfig fields, the POX
response's namespaces, plistlib for Apple's profile), and every server it
names is then logged into, with the TLS mode it names, verifying the
certificate for the host name it names.  [listen] pop3 is off here: no
document may offer it.  Hostile clients (huge head, huge body, slow loris,
garbage, traversal) get a clear 4xx or a close, and the server goes on.
"""

from __future__ import annotations

import http.client
import imaplib
import plistlib
import poplib
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from tests.support.certs import Pki, make_pki
from tests.support.helpers import ALICE, ALICE_PW
from tests.support.ports import free_port
from tests.support.server import PostofficeServer

HOST = "mail.example.test"
AUTOCONFIG = "autoconfig.example.test"
POX_REQUEST = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
POX = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
OUTLOOK = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"


class Web:
    def __init__(self, srv: PostofficeServer, pki: Pki, https: int, http: int) -> None:
        self.srv, self.pki, self.https, self.http = srv, pki, https, http

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pki.ca))

    def curl(self, curl: str, url_path: str, *args: str, host: str = AUTOCONFIG) -> bytes:
        result = subprocess.run(
            [
                curl,
                "--silent",
                "--show-error",
                "--fail",
                "--cacert",
                str(self.pki.ca),
                "--resolve",
                f"{host}:{self.https}:127.0.0.1",
                "--resolve",
                f"{host}:{self.http}:127.0.0.1",
                *args,
                f"https://{host}:{self.https}{url_path}",
            ],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def tls(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.https), timeout=20)
        return self.context().wrap_socket(sock, server_hostname=AUTOCONFIG)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.https, context=self._named_context(), timeout=20
        )
        try:
            conn.request(method, path, body=body, headers={"Host": AUTOCONFIG, **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def _named_context(self) -> ssl.SSLContext:
        # http.client verifies against the host it connects to (127.0.0.1):
        # check the name the clients would use instead, by hand.
        ctx = self.context()
        ctx.check_hostname = False
        return ctx

    def healthy(self) -> None:
        status, _h, body = self.request("GET", "/mail/config-v1.1.xml?emailaddress=" + ALICE)
        assert status == 200 and b"clientConfig" in body


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    root = tmp_path_factory.mktemp("autoconfig")
    pki = make_pki(root / "pki", [HOST, AUTOCONFIG])
    https, http_port = free_port(("127.0.0.1",)), free_port(("127.0.0.1",))
    srv = PostofficeServer(
        root,
        hostname=HOST,
        sections={
            "listen": {
                "pop3": [],
                "https": [f"127.0.0.1:{https}"],
                "http": [f"127.0.0.1:{http_port}"],
            },
            "tls": {"cert": str(pki.cert), "key": str(pki.key)},
        },
    )
    srv.ports.pop("pop3")
    srv.ports |= {"https": https, "http": http_port}
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    try:
        yield Web(srv, pki, https, http_port)
    finally:
        srv.stop()


# --- the servers a document names must work as named -------------------------------------
def login(web: Web, protocol: str, security: str, host: str, port: int, user: str) -> None:
    """Log in as ``user`` where a document says, verifying the certificate
    for ``host`` (resolved to loopback, as the test's --resolve does)."""
    assert host == HOST
    ctx = web.context()
    assert security in ("SSL", "STARTTLS", "tls", "starttls")
    implicit = security in ("SSL", "tls")

    def connect(*_args: object, **_kw: object) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=20)

    if protocol == "imap":
        imap = (
            imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=20)
            if implicit
            else imaplib.IMAP4(host, port, timeout=20)
        )
        if not implicit:
            imap.starttls(ctx)
        imap.login(user, ALICE_PW)
        imap.logout()
    elif protocol == "pop3":
        pop = (
            poplib.POP3_SSL(host, port, context=ctx, timeout=20)
            if implicit
            else poplib.POP3(host, port, timeout=20)
        )
        if not implicit:
            pop.stls(ctx)
        pop.user(user)
        pop.pass_(ALICE_PW)
        pop.quit()
    else:
        smtp = (
            smtplib.SMTP_SSL(host, port, context=ctx, timeout=20)
            if implicit
            else smtplib.SMTP(host, port, timeout=20)
        )
        if not implicit:
            smtp.starttls(context=ctx)
        smtp.login(user, ALICE_PW)
        smtp.quit()


@pytest.fixture(autouse=True)
def mail_host_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients resolve the named host name to loopback (curl's --resolve,
    for the stdlib clients; only the test's own resolution is changed)."""
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kw: Any) -> Any:
        return real("127.0.0.1" if host in (HOST, AUTOCONFIG) else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


# --- Thunderbird -------------------------------------------------------------------------
# Thunderbird's readFromXML.sys.mjs: the values each field may take.
TB_SOCKET_TYPES = {"plain", "SSL", "STARTTLS"}
TB_AUTH = {
    "password-cleartext",
    "password-encrypted",
    "GSSAPI",
    "NTLM",
    "OAuth2",
    "client-IP-address",
    "TLS-client-cert",
    "none",
}


def thunderbird_servers(xml: bytes, domain: str) -> list[tuple[str, str, str, int, str]]:
    """(kind, type, socketType, port, hostname) per server, read as Thunderbird reads them."""
    root = ET.fromstring(xml)
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == domain
    assert [d.text for d in provider.findall("domain")] == [domain]
    assert provider.findtext("displayName")
    found = []
    for kind in ("incomingServer", "outgoingServer"):
        for node in provider.findall(kind):
            kind_type = node.get("type") or ""
            assert kind_type in (("imap", "pop3") if kind == "incomingServer" else ("smtp",))
            port = int(node.findtext("port") or "0")
            assert 0 < port < 65536
            socket_type = node.findtext("socketType")
            assert socket_type in TB_SOCKET_TYPES and socket_type != "plain"
            assert node.findtext("authentication") in TB_AUTH
            assert node.findtext("username") == "%EMAILADDRESS%"
            found.append((kind, kind_type, socket_type, port, node.findtext("hostname") or ""))
    return found


def test_thunderbird_autoconfig_over_curl(web: Web, require_program: Callable[[str], str]) -> None:
    curl = require_program("curl")
    ports = web.srv.ports
    for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
        xml = web.curl(curl, f"{path}?emailaddress=alice%40example.test")
        servers = thunderbird_servers(xml, "example.test")
        # Implicit TLS first (RFC 8314 §3.3), pop3 (off) nowhere.
        assert servers == [
            ("incomingServer", "imap", "SSL", ports["imaps"], HOST),
            ("incomingServer", "pop3", "SSL", ports["pop3s"], HOST),
            ("incomingServer", "imap", "STARTTLS", ports["imap"], HOST),
            ("outgoingServer", "smtp", "SSL", ports["submissions"], HOST),
            ("outgoingServer", "smtp", "STARTTLS", ports["submission"], HOST),
        ]
    for _kind, protocol, socket_type, port, host in servers:
        login(web, protocol, socket_type, host, port, ALICE)  # %EMAILADDRESS%
    # Without ?emailaddress=, the autoconfig.<domain> host names the domain.
    assert thunderbird_servers(web.curl(curl, "/mail/config-v1.1.xml"), "example.test")


def test_thunderbird_refuses_other_domains(web: Web) -> None:
    for query in ("?emailaddress=bob@elsewhere.test", "?emailaddress=not-an-address", ""):
        status, _h, _b = web.request(
            "GET", "/mail/config-v1.1.xml" + query, headers={"Host": "www.example.test"}
        )
        assert status == 404, query


# --- Outlook -----------------------------------------------------------------------------
def pox_request(address: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover xmlns="{POX_REQUEST}">'
        f"<Request><EMailAddress>{address}</EMailAddress><AcceptableResponseSchema>"
        "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
        "</AcceptableResponseSchema></Request></Autodiscover>"
    ).encode()


def test_autodiscover_pox(web: Web, require_program: Callable[[str], str]) -> None:
    curl = require_program("curl")
    ports = web.srv.ports
    for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
        xml = web.curl(
            curl, path, "--data-binary", pox_request(ALICE).decode(), "-H", "Content-Type: text/xml"
        )
        root = ET.fromstring(xml)
        assert root.tag == f"{POX}Autodiscover"
        account = root.find(f"{OUTLOOK}Response/{OUTLOOK}Account")
        assert account is not None
        assert account.findtext(f"{OUTLOOK}AccountType") == "email"
        assert account.findtext(f"{OUTLOOK}Action") == "settings"
        protocols = [
            {child.tag.removeprefix(OUTLOOK): child.text for child in node}
            for node in account.findall(f"{OUTLOOK}Protocol")
        ]
        assert [(p["Type"], p["Port"], p["Encryption"]) for p in protocols] == [
            ("IMAP", str(ports["imaps"]), "SSL"),
            ("POP3", str(ports["pop3s"]), "SSL"),
            ("SMTP", str(ports["submissions"]), "SSL"),
        ]
    for p in protocols:
        assert p["Server"] == HOST and p["LoginName"] == ALICE and p["SPA"] == "off"
        assert p["SSL"] == "on" and p["AuthRequired"] == "on"
        login(web, (p["Type"] or "").lower(), "SSL", HOST, int(p["Port"] or 0), ALICE)
    # GET is not autodiscover; another domain is not ours; a DTD is refused.
    assert web.request("GET", "/autodiscover/autodiscover.xml")[0] == 405
    assert web.request("POST", "/autodiscover/autodiscover.xml", pox_request("a@b.test"))[0] == 404
    laughs = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx">]>' + pox_request(ALICE)
    assert web.request("POST", "/autodiscover/autodiscover.xml", laughs)[0] == 404


# --- Apple -------------------------------------------------------------------------------
def test_apple_mobileconfig(web: Web, require_program: Callable[[str], str]) -> None:
    curl = require_program("curl")
    body = web.curl(curl, f"/apple/mobileconfig?email={ALICE}", host=HOST)
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration"
    assert profile["PayloadVersion"] == 1
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert mail["EmailAccountType"] == "EmailTypeIMAP"
    assert mail["EmailAddress"] == ALICE
    for side in ("Incoming", "Outgoing"):
        assert mail[f"{side}MailServerHostName"] == HOST
        assert mail[f"{side}MailServerUsername"] == ALICE
        assert mail[f"{side}MailServerUseSSL"] is True
        assert mail[f"{side}MailServerAuthentication"] == "EmailAuthPassword"
    assert mail["IncomingMailServerPortNumber"] == web.srv.ports["imaps"]
    assert mail["OutgoingMailServerPortNumber"] == web.srv.ports["submissions"]
    uuids = {profile["PayloadUUID"], mail["PayloadUUID"]}
    assert len(uuids) == 2 and all(uuid.UUID(u) for u in uuids)
    assert profile["PayloadIdentifier"] != mail["PayloadIdentifier"]
    # Another user's profile has its own UUIDs; the same user's keeps them.
    other = plistlib.loads(web.curl(curl, "/apple/mobileconfig?email=bob@example.test", host=HOST))
    assert other["PayloadUUID"] not in uuids
    assert plistlib.loads(body) == plistlib.loads(
        web.curl(curl, f"/apple/mobileconfig?email={ALICE}", host=HOST)
    )
    status, headers, _b = web.request("GET", f"/apple/mobileconfig?email={ALICE}")
    assert status == 200
    assert headers["Content-Type"] == "application/x-apple-aspen-config"
    login(web, "imap", "SSL", HOST, mail["IncomingMailServerPortNumber"], ALICE)
    login(web, "smtp", "SSL", HOST, mail["OutgoingMailServerPortNumber"], ALICE)
    assert web.request("GET", "/apple/mobileconfig?email=x@elsewhere.test")[0] == 404


# --- port 80 -----------------------------------------------------------------------------
def test_http_redirects_to_https(web: Web, require_program: Callable[[str], str]) -> None:
    curl = require_program("curl")
    conn = http.client.HTTPConnection("127.0.0.1", web.http, timeout=20)
    path = f"/mail/config-v1.1.xml?emailaddress={ALICE}"
    conn.request("GET", path, headers={"Host": AUTOCONFIG})
    response = conn.getresponse()
    response.read()
    assert response.status == 301
    assert response.getheader("Location") == f"https://{AUTOCONFIG}:{web.https}{path}"
    conn.request("POST", "/autodiscover/autodiscover.xml", headers={"Host": "evil.test"})
    response = conn.getresponse()
    response.read()
    assert response.status == 308  # keeps the method; a foreign Host goes to ours
    assert (
        response.getheader("Location")
        == f"https://{HOST}:{web.https}/autodiscover/autodiscover.xml"
    )
    conn.close()
    # curl follows it to the document, verified over TLS.
    result = subprocess.run(
        [
            curl,
            "--silent",
            "--fail",
            "--location",
            "--cacert",
            str(web.pki.ca),
            "--resolve",
            f"{AUTOCONFIG}:{web.http}:127.0.0.1",
            "--resolve",
            f"{AUTOCONFIG}:{web.https}:127.0.0.1",
            f"http://{AUTOCONFIG}:{web.http}{path}",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert thunderbird_servers(result.stdout, "example.test")


# --- the HTTP server's bounds -------------------------------------------------------------
def exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
    return got


def test_keep_alive_and_unknown_paths(web: Web) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", web.https, context=web._named_context())
    for path, status in [
        ("/mail/config-v1.1.xml?emailaddress=" + ALICE, 200),
        ("/nothing", 404),
        ("/mail/../mail/config-v1.1.xml?emailaddress=" + ALICE, 404),
        ("/%2e%2e/%2e%2e/etc/passwd", 404),
        ("/MAIL/CONFIG-V1.1.XML?emailaddress=" + ALICE, 404),
    ]:
        conn.request("GET", path, headers={"Host": AUTOCONFIG})
        response = conn.getresponse()
        response.read()
        assert response.status == status, path
    conn.request("DELETE", "/mail/config-v1.1.xml", headers={"Host": AUTOCONFIG})
    response = conn.getresponse()
    response.read()
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"
    conn.request(
        "HEAD", "/mail/config-v1.1.xml?emailaddress=" + ALICE, headers={"Host": AUTOCONFIG}
    )
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    assert int(response.getheader("Content-Length") or 0) > 100
    conn.close()


def test_huge_head_is_431(web: Web) -> None:
    with web.tls() as sock:
        got = exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    web.healthy()


def test_huge_post_body_is_413_unread(web: Web) -> None:
    with web.tls() as sock:
        head = (
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        started = time.monotonic()
        got = exchange(sock, head + b"x" * 1000)
    assert got.startswith(b"HTTP/1.1 413 "), got[:80]
    assert time.monotonic() - started < 5
    with web.tls() as sock:  # chunked: cut off once it passes the cap (16 KiB)
        sock.sendall(
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        got = exchange(sock, b"4000\r\n" + b"y" * 0x4000 + b"\r\n" + b"10\r\n" + b"z" * 16)
    assert got.startswith(b"HTTP/1.1 413 "), got[:80]
    web.healthy()


def test_slow_loris_is_cut_off(web: Web) -> None:
    """A byte every half second: answered 408 and closed REQUEST_SECONDS (10)
    after the first octet, however steadily the bytes come."""
    with web.tls() as sock:
        sock.settimeout(30)
        started = time.monotonic()
        got = b""
        for byte in b"GET /mail/config-v1.1.xml HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                break
            if select.select([sock], [], [], 0.5)[0]:
                got = exchange(sock, b"")
                break
        elapsed = time.monotonic() - started
    assert got.startswith(b"HTTP/1.1 408 "), got[:80]
    assert 9 < elapsed < 13, elapsed
    web.healthy()


def test_garbage_is_400_and_plaintext_on_tls_is_dropped(web: Web) -> None:
    with web.tls() as sock:
        got = exchange(sock, b"\x00\x01\x02\xff\xfe SMTP? EHLO x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 "), got[:80]
    with socket.create_connection(("127.0.0.1", web.https), timeout=20) as plain:
        assert exchange(plain, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[:5] != b"HTTP/"
    with socket.create_connection(("127.0.0.1", web.http), timeout=20) as plain:
        got = exchange(plain, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 "), got[:80]
    web.healthy()


def test_reload_swaps_the_https_certificate(
    web: Web, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGHUP: new connections get the new certificate (reload.py; the https
    listener is refreshed with the mail listeners), an open one keeps going."""
    kept = http.client.HTTPSConnection("127.0.0.1", web.https, context=web._named_context())
    kept.request("GET", "/mail/config-v1.1.xml?emailaddress=" + ALICE, headers={"Host": AUTOCONFIG})
    assert kept.getresponse().read()
    old = web.pki.cert.read_bytes(), web.pki.key.read_bytes()
    new = make_pki(tmp_path_factory.mktemp("newpki"), [HOST, AUTOCONFIG])
    try:
        web.pki.cert.write_bytes(new.cert.read_bytes())
        web.pki.key.write_bytes(new.key.read_bytes())
        assert web.srv.proc is not None
        web.srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "SIGHUP: reloaded" not in web.srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        ctx = ssl.create_default_context(cafile=str(new.ca))
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", web.https), timeout=20),
            server_hostname=AUTOCONFIG,
        ) as tls:
            got = exchange(tls, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 404 ")
        # The connection from before the reload still serves requests.
        kept.request("GET", "/nothing", headers={"Host": AUTOCONFIG})
        assert kept.getresponse().status == 404
        kept.close()
    finally:
        web.pki.cert.write_bytes(old[0])
        web.pki.key.write_bytes(old[1])
        assert web.srv.proc is not None
        web.srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while web.srv.log().count("SIGHUP: reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    web.healthy()
