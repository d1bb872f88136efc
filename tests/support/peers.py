"""Real peers the tests talk to: a DNS server, MTAs to deliver to.

* ``Dnsmasq`` runs Debian's dnsmasq on a loopback port, authoritative for
  ``.test`` (unknown names there are NXDOMAIN), serving the MX and address
  records a test asks for (null MX as a raw record).
* ``SmtpSink`` runs Postfix's ``smtp-sink``, which accepts (or, with options,
  refuses) mail and dumps each message to a file.
* ``ScriptedMta`` is a small SMTP server in a thread of its own, for what
  smtp-sink cannot do: per-recipient answers, STARTTLS, recording the
  commands it saw.

Every process is started and stopped by its PID; everything listens on
127.0.0.0/8 only.  Ports come from tests.support.ports, waiting from
tests.support.helpers.wait_for; TXT and PTR records for the
mail-authentication tests are added by tests.support.dns.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

from tests.support.helpers import wait_for
from tests.support.ports import free_port

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Dnsmasq:
    """dnsmasq on 127.0.0.1:<free port>, answering for ``.test`` only."""

    def __init__(
        self,
        root: Path,
        *,
        mx: Iterable[tuple[str, str, int]] = (),
        hosts: dict[str, Sequence[str]] | None = None,
        null_mx: Iterable[str] = (),
    ) -> None:
        self.root = root
        self.port = free_port(("127.0.0.1",), socket.SOCK_DGRAM)
        self.args = [
            DNSMASQ,
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--local=/test/",  # names under .test that we do not list: NXDOMAIN
        ]
        for domain, host, pref in mx:
            self.args.append(f"--mx-host={domain},{host},{pref}")
        for name, addrs in (hosts or {}).items():
            self.args.append(f"--host-record={name},{','.join(addrs)}")
        for domain in null_mx:
            # RFC 7505: MX 0 "." as raw RDATA (preference 0, root name).
            self.args.append(f"--dns-rr={domain},15,000000")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"dnsmasq-{self.port}.log"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        query = dns.message.make_query("probe.test.", dns.rdatatype.A)
        try:
            dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        return True

    def start(self) -> Dnsmasq:
        for _ in range(5):  # the free port may be taken before dnsmasq binds it: pick another
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
            time.sleep(0.1)
            if self.proc.poll() is None or b"in use" not in self.log.read_bytes():
                break
            self.port = free_port(("127.0.0.1",), socket.SOCK_DGRAM)
            self.args = [a for a in self.args if not a.startswith("--port=")]
            self.args.append(f"--port={self.port}")
            self.log.write_bytes(b"")
        if not wait_for(
            lambda: self.proc is not None and (self.proc.poll() is not None or self._answers()), 10
        ):
            self.stop()
            raise RuntimeError("dnsmasq did not answer")
        if self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {self.log.read_text()}")
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class SmtpSink:
    """Postfix's smtp-sink on ``host:port``; messages are dumped under ``root``."""

    def __init__(self, root: Path, host: str, port: int, *options: str, name: str = "") -> None:
        self.host, self.port, self.options = host, port, list(options)
        self.dump = root / f"sink-{name or host}-{port}"
        self.dump.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        args = [
            SMTP_SINK,
            "-u",
            "root",
            "-h",
            f"sink-{self.host}",
            "-d",
            f"{self.dump}/m.",
            *self.options,
            f"{self.host}:{self.port}",
            "64",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        if not wait_for(up, 10):
            self.stop()
            raise RuntimeError("smtp-sink did not start")
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def messages(self) -> list[bytes]:
        """Dumped transactions whose message is complete (smtp-sink writes the
        final empty line after the end of data)."""
        found = []
        for path in sorted(self.dump.iterdir()):
            data = path.read_bytes()
            if data.endswith(b"\n\n") or data.endswith(b"\n"):
                found.append(data)
        return found


# --- a scripted MTA ----------------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes  # un-dot-stuffed, CRLF as sent
    tls: bool
    mail_params: str


@dataclass
class ScriptedMta:
    """A tiny SMTP server in its own thread and loop.

    ``rcpt_reply(address) -> reply line`` decides RCPT answers (default 250);
    ``extensions`` are the EHLO keywords; with ``tls`` it offers STARTTLS.
    With CHUNKING among them it reads BDAT chunks by count (RFC 3030);
    ``chunk_reply(n) -> reply line`` answers the n-th chunk (0-based) of a
    message that is not its last.
    """

    host: str
    port: int
    extensions: Sequence[str] = ("PIPELINING", "8BITMIME", "SIZE 10000000", "ENHANCEDSTATUSCODES")
    tls: ssl.SSLContext | None = None
    rcpt_reply: Callable[[str], str] = lambda _a: "250 2.1.5 Ok"
    data_reply: str = "250 2.0.0 Ok: queued"
    greeting: str = "220 {host} ESMTP scripted"
    esmtp: bool = True  # False: EHLO is "502", as an old HELO-only server says
    break_tls: bool = False  # answer STARTTLS with 220, then hang up mid-handshake
    data_delay: float = 0.0  # seconds before the reply to the final dot
    chunk_reply: Callable[[int], str] = lambda _n: "250 2.0.0 Ok: chunk"
    active: int = 0  # connections open right now
    max_active: int = 0  # the most connections open at once
    received: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None

    def start(self) -> ScriptedMta:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._server = await asyncio.start_server(self._session, self.host, self.port)
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("scripted MTA did not start")
        return self

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)  # let closing transports (and TLS shutdowns) finish

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False
        sender, rcpts, params = "", [], ""
        chunks: list[bytes] = []  # the BDAT chunks of the message so far
        self.active += 1
        self.max_active = max(self.max_active, self.active)

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await say(self.greeting.format(host=self.host))
            if not self.greeting.startswith("2"):
                return
            for _ in range(1000):
                raw = await asyncio.wait_for(reader.readline(), 30)
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(line)
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO" and not self.esmtp:
                    await say("502 5.5.2 Error: command not recognized")
                elif verb == "EHLO":
                    exts = list(self.extensions)
                    if self.tls is not None and not tls:
                        exts.append("STARTTLS")
                    lines = [self.host, *exts]
                    for i, text in enumerate(lines):
                        await say(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
                elif verb == "HELO":
                    await say(f"250 {self.host}")
                elif verb == "STARTTLS" and self.tls is not None and not tls:
                    await say("220 2.0.0 Ready to start TLS")
                    if self.break_tls:
                        writer.write(b"this is not a TLS record\r\n")
                        await writer.drain()
                        return
                    await writer.start_tls(self.tls)
                    tls = True
                elif verb == "MAIL":
                    arg = line[10:]
                    sender, _sp, params = arg.partition(" ")
                    rcpts = []
                    await say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    addr = line[8:].strip()
                    reply = self.rcpt_reply(addr.strip("<>"))
                    if reply.startswith("2"):
                        rcpts.append(addr)
                    await say(reply)
                elif verb == "DATA":
                    if not rcpts:
                        await say("554 5.5.1 Error: no valid recipients")
                        continue
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    body = bytearray()
                    for _ in range(1_000_000):
                        chunk = await asyncio.wait_for(reader.readline(), 30)
                        if not chunk or chunk == b".\r\n":
                            break
                        body += chunk[1:] if chunk.startswith(b".") else chunk
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    self.received.append(Received(sender, list(rcpts), bytes(body), tls, params))
                    await say(self.data_reply)
                    rcpts = []
                elif verb == "BDAT" and "CHUNKING" in self.extensions:
                    words = line.split(" ")
                    chunk = await reader.readexactly(int(words[1]))
                    if not rcpts:
                        await say("503 5.5.1 Error: need RCPT")
                    elif len(words) == 3 and words[2].upper() == "LAST":
                        body = b"".join(chunks) + chunk
                        self.received.append(Received(sender, list(rcpts), body, tls, params))
                        chunks, rcpts = [], []
                        await say(self.data_reply)
                    else:
                        reply = self.chunk_reply(len(chunks))
                        chunks.append(chunk)
                        if not reply.startswith("2"):
                            chunks, rcpts = [], []  # RFC 3030 §2: the transaction failed
                        await say(reply)
                elif verb == "RSET":
                    rcpts = []
                    chunks = []
                    await say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    await say("221 2.0.0 Bye")
                    return
                else:
                    await say("502 5.5.2 Error: command not recognized")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
