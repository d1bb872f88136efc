"""ManageSieve over a raw socket, where sieve-connect cannot go (RFC 5804).

A password is refused before STARTTLS on a config without the loopback
exemption (the SASL capability is empty, AUTHENTICATE answers NO
(ENCRYPT-NEEDED) and no login is attempted); after STARTTLS it works.
UNAUTHENTICATE (§2.14.1) returns to the non-authenticated state, so the
next AUTHENTICATE may be another user.  Each command is counted by name in
the metrics, as IMAP's and POP3's are.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_metrics import scrape, value
from tests.support.helpers import ALICE, ALICE_PW, BOB, BOB_PW, tls_context
from tests.support.ports import free_port
from tests.support.server import PostofficeServer


class SieveClient:
    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=15
        )
        self.file = self.sock.makefile("rb")

    def response(self) -> tuple[list[str], str]:
        """Lines up to the final OK/NO/BYE (bounded), and that line."""
        lines: list[str] = []
        for _ in range(100):
            line = self.file.readline().decode().rstrip("\r\n")
            if line.split(" ", 1)[0] in ("OK", "NO", "BYE"):
                return lines, line
            lines.append(line)
        raise AssertionError(f"no final response after {lines}")

    def cmd(self, line: str) -> tuple[list[str], str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.response()

    def starttls(self) -> tuple[list[str], str]:
        assert self.cmd("STARTTLS")[1].startswith("OK")
        self.sock = tls_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")
        return self.response()  # the capabilities again (§2.2)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    root: Path = tmp_path_factory.mktemp("managesieve")
    port = free_port(("127.0.0.1",))
    server = PostofficeServer(
        root,
        sections={
            "listen": {"managesieve": [f"127.0.0.1:{port}"]},
            "auth": {"allow_plaintext_loopback": False},
        },
    )
    server.ports["managesieve"] = port
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, BOB_PW)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_no_password_before_starttls_then_unauthenticate(srv: PostofficeServer) -> None:
    before = scrape(srv)
    client = SieveClient(srv.ports["managesieve"])
    try:
        greeting, ok = client.response()
        assert ok.startswith("OK")
        assert '"SASL" ""' in greeting and '"STARTTLS"' in greeting
        assert '"UNAUTHENTICATE"' in greeting
        _, refused = client.cmd(f'AUTHENTICATE "PLAIN" "{plain(ALICE, ALICE_PW)}"')
        assert refused.startswith("NO (ENCRYPT-NEEDED)")
        assert client.cmd("LISTSCRIPTS")[1].startswith("NO")

        capabilities, ok = client.starttls()
        assert ok.startswith("OK") and '"SASL" "PLAIN' in " ".join(capabilities)
        assert client.cmd("UNAUTHENTICATE")[1].startswith("NO")  # not logged in yet
        assert client.cmd(f'AUTHENTICATE "PLAIN" "{plain(ALICE, ALICE_PW)}"')[1].startswith("OK")
        capabilities, _ = client.cmd("CAPABILITY")
        assert f'"OWNER" "{ALICE}"' in capabilities
        assert client.cmd('PUTSCRIPT "mine" {5+}\r\nkeep;')[1].startswith("OK")

        assert client.cmd("UNAUTHENTICATE")[1].startswith("OK")
        assert client.cmd("LISTSCRIPTS")[1] == 'NO "Authenticate first"'
        capabilities, _ = client.cmd("CAPABILITY")
        assert not any(c.startswith('"OWNER"') for c in capabilities)
        # Another user on the same (still TLS) connection sees only their scripts.
        assert client.cmd(f'AUTHENTICATE "PLAIN" "{plain(BOB, BOB_PW)}"')[1].startswith("OK")
        scripts, ok = client.cmd("LISTSCRIPTS")
        assert ok.startswith("OK") and scripts == []
        assert client.cmd("LOGOUT")[1].startswith("OK")
    finally:
        client.close()
    assert srv.cli("sieve", "list", ALICE).stdout == "mine\n"

    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    commands = "postoffice_managesieve_commands_total"
    assert delta(commands, command="AUTHENTICATE") == 3
    assert delta(commands, command="UNAUTHENTICATE") == 2
    assert delta(commands, command="STARTTLS") == 1
    assert delta(commands, command="LISTSCRIPTS") == 3
    assert delta(commands, command="PUTSCRIPT") == 1
    assert delta("postoffice_sessions_total", protocol="managesieve") == 1
    auth = "postoffice_auth_attempts_total"
    assert delta(auth, protocol="managesieve", result="success") == 2
    assert delta(auth, protocol="managesieve", result="failure") == 0  # refused unread
