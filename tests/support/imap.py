"""IMAP test clients and the mail they use, shared by the IMAP test modules."""

from __future__ import annotations

import imaplib
import smtplib
import ssl

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
