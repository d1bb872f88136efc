"""One ManageSieve (RFC 5804) connection: the core (protocol/managesieve.py) over a Connection.

Login and TLS work as in POP3 and IMAP: STARTTLS through the shared
Connection, AUTHENTICATE through the one SASL exchange (protocol/sasl.py)
and the one authenticator with its throttle (policy/auth.py); a password
only over TLS or loopback as ``may_send_password`` decides.  Scripts live in
storage/sieve_scripts.py (the CLI's store too) and every upload is compiled
first (delivery/sieve.py), so a syntax error is refused with its line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import TypeVar

from postoffice import logfmt, metrics
from postoffice.mail.address import Address
from postoffice.net.connection import Connection, ConnectionClosed, ShuttingDown
from postoffice.policy.auth import LoginThrottled
from postoffice.policy.clients import may_send_password
from postoffice.protocol import sasl
from postoffice.protocol.managesieve import (
    BadCommand,
    Command,
    ManageSieveServer,
    literal,
    quote,
    response,
)
from postoffice.protocol.sieve_parse import SieveLimits, SieveSyntaxError, parse_script
from postoffice.protocol.sieve_run import EXTENSIONS, RunLimits, SieveCheckError, check_script
from postoffice.services import Services
from postoffice.storage.sieve_scripts import ScriptError, SieveScripts

log = logging.getLogger("postoffice.managesieve")
T = TypeVar("T")

TLS_HANDSHAKE_TIMEOUT = 30.0
MAX_AUTH_FAILURES = 3
TIMEOUT = 600.0  # RFC 5804 §1.7 leaves it to us; idle clients are cut off


class _Close(Exception):
    pass


class ManageSieveSession:
    def __init__(self, services: Services, conn: Connection) -> None:
        self.s = services
        self.conn = conn
        self.core = ManageSieveServer(max_literal=SieveLimits().max_bytes + 1024)
        self.client_ip = conn.peer[0]
        self.scripts = SieveScripts(services.settings.sieve_dir)
        self.user: Address | None = None
        self.errors = 0
        self.auth_failures = 0
        self._sasl: sasl.SaslExchange | None = None
        conn.write_timeout = TIMEOUT

    async def run(self) -> None:
        metrics.session("managesieve")
        try:
            self._capabilities()
            self.conn.write(response("OK", f"{self.s.settings.hostname} ManageSieve ready"))
            await self._serve()
        except (ConnectionClosed, ConnectionError, _Close, TimeoutError):
            pass
        except ShuttingDown:
            self.conn.write(response("BYE", "Server shutting down", "TRYLATER"))
        finally:
            log.info(
                "managesieve session client=%s user=%s tls=%s",
                self.client_ip,
                logfmt.field(str(self.user) if self.user else "-"),
                "yes" if self.conn.tls else "no",
            )
            await self.conn.close()

    async def _serve(self) -> None:
        while True:
            event = self.core.next_command()
            if event is None:
                await self.conn.drain()
                data = await self.conn.read(TIMEOUT, interruptible=self._sasl is None)
                self.core.receive_data(data)
                continue
            if isinstance(event, BadCommand):
                metrics.managesieve_command("other")
                self._no(event.reason, event.code)
                continue
            metrics.managesieve_command(event.name)
            await self._dispatch(event)
            await self.conn.drain()

    def _no(self, text: str, code: str = "") -> None:
        self.errors += 1
        if self.errors >= self.s.settings.limits.max_errors:
            self.conn.write(response("BYE", "Too many errors"))
            raise _Close
        self.conn.write(response("NO", text, code))

    def _plaintext_ok(self) -> bool:
        return may_send_password(
            self.conn.tls, self.client_ip, self.s.settings.auth.allow_plaintext_loopback
        )

    def _capabilities(self) -> None:
        lines = [
            b'"IMPLEMENTATION" "postoffice"\r\n',
            b'"SIEVE" ' + quote(" ".join(sorted(EXTENSIONS))) + b"\r\n",
            b'"VERSION" "1.0"\r\n',
            b'"MAXREDIRECTS" "%d"\r\n' % RunLimits().max_redirects,
        ]
        if self._plaintext_ok() and self.user is None:
            lines.append(b'"SASL" "' + " ".join(sasl.MECHANISMS).encode() + b'"\r\n')
        else:
            lines.append(b'"SASL" ""\r\n')
        if not self.conn.tls:
            lines.append(b'"STARTTLS"\r\n')
        if self.user is not None:
            lines.append(b'"OWNER" ' + quote(str(self.user)) + b"\r\n")
        lines.append(b'"UNAUTHENTICATE"\r\n')  # RFC 5804 §2.14.1
        self.conn.write(b"".join(lines))

    async def _blocking(self, func: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.s.executor, func, *args)

    async def _dispatch(self, cmd: Command) -> None:
        name, args = cmd.name, cmd.arguments
        if self._sasl is not None:
            await self._sasl_reply(self._sasl.respond(str(args[0]) if args else "*"))
            return
        if name == "CAPABILITY":
            self._capabilities()
            self.conn.write(response("OK", "Capability completed"))
        elif name == "NOOP":
            tag = f"TAG {quote(str(args[0])).decode()}" if args else ""
            self.conn.write(response("OK", "Done", tag))
        elif name == "LOGOUT":
            self.conn.write(response("OK", "Logout completed"))
            raise _Close
        elif name == "STARTTLS":
            await self._starttls()
        elif name == "AUTHENTICATE":
            await self._authenticate(args)
        elif name == "UNAUTHENTICATE":
            self._unauthenticate()
        elif self.user is None:
            self._no("Authenticate first")
        else:
            await self._script_command(self.user, name, args)

    async def _starttls(self) -> None:
        if self.conn.tls:
            self._no("Already using TLS")
            return
        if self.core.has_buffered_data:
            # RFC 5804 §2.2 (as RFC 2595 §4): nothing may be pipelined behind it.
            self.conn.write(response("BYE", "Nothing may follow STARTTLS"))
            raise _Close
        self.conn.write(response("OK", "Begin TLS negotiation"))
        await self.conn.drain()
        try:
            await self.conn.start_tls(self.s.tls, TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("managesieve client=%s STARTTLS failed: %s", self.client_ip, exc)
            raise _Close from None
        # §2.2: the capabilities again, now that they may differ.
        self._capabilities()
        self.conn.write(response("OK", "TLS negotiation successful"))

    async def _authenticate(self, args: tuple[str | int, ...]) -> None:
        if self.user is not None:
            self._no("Already authenticated")
            return
        if not self._plaintext_ok():
            self._no("Authentication requires STARTTLS", "ENCRYPT-NEEDED")
            return
        if not args or not isinstance(args[0], str):
            self._no("AUTHENTICATE needs a mechanism")
            return
        exchange = sasl.SaslExchange.start(args[0])
        if exchange is None:
            self._no("Unsupported mechanism")
            return
        self._sasl = exchange
        initial = str(args[1]) if len(args) > 1 else None
        await self._sasl_reply(exchange.initial(initial if initial else None))

    def _unauthenticate(self) -> None:
        """RFC 5804 §2.14.1: back to the non-authenticated state, TLS kept
        (no SASL security layer is ever negotiated here, so none to drop)."""
        if self.user is None:
            self._no("Not authenticated")
            return
        log.info("managesieve client=%s user=%s unauthenticated", self.client_ip, self.user)
        self.user = None
        self.conn.write(response("OK", "Unauthenticate completed"))

    async def _sasl_reply(self, outcome: sasl.Outcome) -> None:
        if isinstance(outcome, sasl.Challenge):
            self.core.expect_sasl_response = True
            self.conn.write(quote(outcome.base64) + b"\r\n")
            return
        self._sasl = None
        self.core.expect_sasl_response = False
        if not isinstance(outcome, sasl.Done):
            self._no(outcome.reason)
            return
        text, code = "Authentication failed", ""
        try:
            user = await self.s.authenticator.login(
                outcome.authcid, outcome.password, self.client_ip, "managesieve"
            )
        except LoginThrottled:
            user, text, code = None, "Too many failed logins, try again later", "TRYLATER"
        if user is None:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.conn.write(response("BYE", text, code))
                raise _Close
            self.conn.write(response("NO", text, code))
            return
        self.user = user
        self.conn.write(response("OK", "Logged in"))

    async def _script_command(self, user: Address, name: str, args: tuple[str | int, ...]) -> None:
        texts = [a for a in args if isinstance(a, str)]
        try:
            if name == "LISTSCRIPTS":
                infos = await self._blocking(self.scripts.list, user)
                self.conn.write(
                    b"".join(
                        quote(i.name) + (b" ACTIVE" if i.active else b"") + b"\r\n" for i in infos
                    )
                    + response("OK", "Listscripts completed")
                )
            elif name == "GETSCRIPT" and len(texts) == 1:
                data = await self._blocking(self.scripts.get, user, texts[0])
                self.conn.write(literal(data) + b"\r\n" + response("OK", "Getscript completed"))
            elif name == "PUTSCRIPT" and len(texts) == 2:
                data = texts[1].encode("utf-8")
                if self._compile_error(data):
                    return
                await self._blocking(self.scripts.put, user, texts[0], data)
                self.conn.write(response("OK", "Putscript completed"))
            elif name == "CHECKSCRIPT" and len(texts) == 1:
                if not self._compile_error(texts[0].encode("utf-8")):
                    self.conn.write(response("OK", "Script is valid"))
            elif name == "SETACTIVE" and len(texts) == 1:
                await self._blocking(self.scripts.activate, user, texts[0] or None)
                self.conn.write(response("OK", "Setactive completed"))
            elif name == "DELETESCRIPT" and len(texts) == 1:
                if await self._blocking(self.scripts.active_name, user) == texts[0]:
                    self.conn.write(response("NO", "Script is active", "ACTIVE"))
                    return
                await self._blocking(self.scripts.delete, user, texts[0])
                self.conn.write(response("OK", "Deletescript completed"))
            elif name == "RENAMESCRIPT" and len(texts) == 2:
                await self._blocking(self.scripts.rename, user, texts[0], texts[1])
                self.conn.write(response("OK", "Renamescript completed"))
            elif name == "HAVESPACE" and len(args) == 2 and isinstance(args[1], int):
                ok = await self._blocking(self.scripts.have_space, user, str(args[0]), args[1])
                if ok:
                    self.conn.write(response("OK", "Putscript would succeed"))
                else:
                    self.conn.write(response("NO", "Script too large or too many", "QUOTA"))
            else:
                self._no(f"Unknown command or wrong arguments: {name}")
        except ScriptError as exc:
            code = "NONEXISTENT" if "no script" in str(exc) else ""
            code = "ALREADYEXISTS" if "exists" in str(exc) else code
            self.conn.write(response("NO", str(exc), code))
        except OSError as exc:
            log.error("managesieve user=%s: %s", user, exc)
            self.conn.write(response("NO", "Cannot reach the scripts now", "TRYLATER"))

    def _compile_error(self, data: bytes) -> bool:
        """Answer NO with the error if ``data`` does not compile (RFC 5804 §2.6)."""
        try:
            check_script(parse_script(data))
        except (SieveSyntaxError, SieveCheckError) as exc:
            self.conn.write(response("NO", f"line {exc.line}, column {exc.column}: {exc.reason}"))
            return True
        return False
