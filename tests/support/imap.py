"""IMAP test clients and the mail they use, shared by the IMAP test modules."""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl
import zlib

from tests.support.server import PostofficeServer

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
BOB, BOB_PW = "bob@example.test", "bob-password-2"
MESSAGE = b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\nHi there\r\n"


def context(srv: PostofficeServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(srv.data_dir / "tls" / "cert.pem"))


def starttls(srv: PostofficeServer, user: str = ALICE, password: str = ALICE_PW) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=15)
    client.starttls(context(srv))
    client.login(user, password)
    return client


def imaps(srv: PostofficeServer, user: str = ALICE, password: str = ALICE_PW) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL(
        "127.0.0.1", srv.ports["imaps"], ssl_context=context(srv), timeout=15
    )
    client.login(user, password)
    return client


def empty_inbox(srv: PostofficeServer, address: str) -> None:
    md = srv.maildir(address)
    for sub in ("new", "cur"):
        if (md / sub).is_dir():
            for path in (md / sub).iterdir():
                path.unlink()


def deliver_smtp(srv: PostofficeServer, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as smtp:
        body = MESSAGE.replace(b"hello", subject.encode())
        smtp.sendmail("bob@example.test", [ALICE], body)


class DeflateImap:
    """A raw IMAP client that speaks COMPRESS=DEFLATE (RFC 4978) with zlib
    itself: ``send`` before ``compress()`` is plain, after it raw DEFLATE
    with a sync flush; ``line`` inflates what the server sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deflater: zlib._Compress | None = None
        self.inflater = zlib.decompressobj(-15)
        self.plain = b""  # received and inflated (or plain), not yet returned
        self.compressed_in = 0  # octets received after compress()
        self.greeting = self.line()

    @classmethod
    def connect(cls, srv: PostofficeServer, port: str = "imap") -> DeflateImap:
        sock = socket.create_connection(("127.0.0.1", srv.ports[port]), timeout=15)
        if port == "imaps":
            sock = context(srv).wrap_socket(sock, server_hostname="127.0.0.1")
        return cls(sock)

    def pack(self, data: bytes) -> bytes:
        """``data`` as it goes on the wire now (compressed once compress() ran)."""
        if self.deflater is None:
            return data
        return self.deflater.compress(data) + self.deflater.flush(zlib.Z_SYNC_FLUSH)

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.pack(data))

    def compress(self) -> None:
        """The rest of the stream, both ways, is DEFLATE (after the OK)."""
        self.deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        # What came in the same read as the OK is already compressed.
        rest, self.plain = self.plain, b""
        self.compressed_in += len(rest)
        self.plain = self.inflater.decompress(rest)

    def line(self) -> bytes:
        """The next line the server sent (b"" at EOF)."""
        while b"\n" not in self.plain:
            data = self.sock.recv(65536)
            if not data:
                return b""
            if self.deflater is not None:
                self.compressed_in += len(data)
                data = self.inflater.decompress(data)
            self.plain += data
        line, _, self.plain = self.plain.partition(b"\n")
        return line + b"\n"

    def until(self, tag: str) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(tag.encode() + b" "):
                return lines

    def cmd(self, tag: str, command: bytes) -> list[bytes]:
        self.send(tag.encode() + b" " + command + b"\r\n")
        return self.until(tag)

    def close(self) -> None:
        self.sock.close()
