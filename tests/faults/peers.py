"""Broken peers for fault tests: an MTA that misbehaves on cue, a DNS server that fails.

What tests/support/peers.py (dnsmasq, smtp-sink, a scripted MTA) cannot
do: stop reading in the middle of DATA, hang up mid-message, answer with
garbage, or answer every DNS query with SERVFAIL.  Both run in a thread of
the test process, on 127.0.0.0/8 only, and stop when asked.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode

# What FaultyMta does once the client has sent DATA and 354 came back, or
# before that for the garbage forms.
BEHAVIOURS = (
    "stall",  # stop reading mid-message and keep the connection open for `hold` seconds
    "drop",  # hang up (RST) mid-message
    "drop-after-dot",  # read the whole message, hang up without a reply (RFC 5321 §6.1)
    "garbage-greeting",  # not SMTP at all
    "garbage-ehlo",  # a greeting, then nonsense where the EHLO reply belongs
    "garbage-after-dot",  # binary noise where the reply to the final dot belongs
    "endless-reply",  # a reply line that never ends
    "greylist",  # 451 to RCPT in the first session, then accept (GREYLIST_REPLY, ACCEPT_REPLY)
)
GREYLIST_REPLY = b"451 4.7.1 Greylisted, please try again later"
ACCEPT_REPLY = b"250 2.0.0 Ok: queued as PEER0001"


@dataclass
class FaultyMta:
    host: str
    port: int
    behaviour: str
    hold: float = 30.0  # how long "stall" keeps the connection
    after: int = 4096  # message octets read before "stall" and "drop"
    sessions: int = 0
    octets: list[int] = field(default_factory=list)  # message octets read per session
    _server: socketserver.ThreadingTCPServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> FaultyMta:
        assert self.behaviour in BEHAVIOURS, self.behaviour
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                peer.sessions += 1
                sock: socket.socket = self.request
                sock.settimeout(60)
                with contextlib.suppress(OSError):
                    peer._session(sock)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        self._server = socketserver.ThreadingTCPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _session(self, sock: socket.socket) -> None:
        file = sock.makefile("rb")

        def say(text: bytes) -> None:
            sock.sendall(text + b"\r\n")

        if self.behaviour == "garbage-greeting":
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            time.sleep(0.5)
            return
        say(b"220 faulty.test ESMTP")
        accepted = False  # a recipient was accepted in this session
        for _ in range(100):
            line = file.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO" and self.behaviour == "garbage-ehlo":
                sock.sendall(b"\x00\xff\xfe garbage \x16\x03\x01\r\n2x0 what\r\n")
                time.sleep(0.5)
                return
            if verb == b"EHLO":
                say(b"250-faulty.test\r\n250-PIPELINING\r\n250 8BITMIME")
            elif verb == b"RCPT" and self.behaviour == "greylist" and self.sessions == 1:
                say(GREYLIST_REPLY)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                accepted = accepted or verb == b"RCPT"
                say(b"250 2.0.0 Ok")
            elif verb == b"DATA" and self.behaviour == "greylist" and not accepted:
                say(b"554 5.5.1 No valid recipients")  # DATA pipelined after a refused RCPT
            elif verb == b"QUIT":
                say(b"221 2.0.0 Bye")
                return
            elif verb == b"DATA":
                say(b"354 go ahead")
                self._data(sock, file)
                return
            else:
                say(b"502 5.5.2 what?")

    def _data(self, sock: socket.socket, file) -> None:  # type: ignore[no-untyped-def]
        read = 0
        if self.behaviour in ("stall", "drop"):
            while read < self.after:
                chunk = file.read1(self.after - read)
                if not chunk:
                    break
                read += len(chunk)
            self.octets.append(read)
            if self.behaviour == "stall":
                self._stop.wait(self.hold)  # read nothing more, say nothing
            _reset(sock)
            return
        for _ in range(10_000_000):
            line = file.readline(65536)
            if not line or line == b".\r\n":
                break
            read += len(line)
        self.octets.append(read)
        if self.behaviour == "greylist":
            sock.sendall(ACCEPT_REPLY + b"\r\n")
        elif self.behaviour == "drop-after-dot":
            _reset(sock)
        elif self.behaviour == "garbage-after-dot":
            sock.sendall(b"\x89PNG\r\n\x1a\n\x00\x00\r\n")
            time.sleep(0.5)
        elif self.behaviour == "endless-reply":
            with contextlib.suppress(OSError):
                for _ in range(256):  # 16 MiB of one line, then hang up
                    sock.sendall(b"2" * 65536)
            _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Hang up with a RST, as a crashed peer's kernel would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@dataclass
class ServfailDns:
    """A DNS server on 127.0.0.1 that answers every query with SERVFAIL."""

    queries: int = 0
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    @property
    def server(self) -> str:
        assert self._sock is not None
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def start(self) -> ServfailDns:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None and sock.fileno() >= 0:
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            self.queries += 1
            answer = dns.message.make_response(query)
            answer.set_rcode(dns.rcode.SERVFAIL)
            answer.flags |= dns.flags.RA
            with contextlib.suppress(OSError):
                sock.sendto(answer.to_wire(), addr)

    def stop(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
