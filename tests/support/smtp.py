"""A raw SMTP line client for tests that need exact bytes on the wire."""

from __future__ import annotations

import contextlib
import socket
import ssl


class RawSmtp:
    # Every client made during a test; the autouse fixture in conftest closes them.
    opened: list[RawSmtp] = []

    def __init__(
        self, host: str, port: int, timeout: float = 10.0, source: str | None = None
    ) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buf = b""
        RawSmtp.opened.append(self)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), lines

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock)

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
