"""IMAP and IMAPS (RFC 9051, 2177, 4315, 6851) against the real server.

Python's imaplib over real sockets: STARTTLS and implicit TLS logins,
LOGINDISABLED on plaintext, folders, SELECT, FETCH, STORE, EXPUNGE, COPY,
MOVE, APPEND, and the mailbox shared with SMTP delivery and POP3.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.helpers import wait_for
from tests.support.imap import (
    ALICE,
    ALICE_PW,
    BOB,
    BOB_PW,
    MESSAGE,
    context,
    deliver_smtp,
    empty_inbox,
    imaps,
    starttls,
)
from tests.support.server import PostofficeServer


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = PostofficeServer(tmp_path_factory.mktemp("imap"))
    server.add_user(ALICE, ALICE_PW)
    server.add_user(BOB, BOB_PW)
    server.start()
    yield server
    server.stop()


def test_plaintext_shows_logindisabled_and_refuses_login(srv: PostofficeServer) -> None:
    client = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=15)
    try:
        assert "LOGINDISABLED" in client.capabilities
        assert "STARTTLS" in client.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
            client.login(ALICE, ALICE_PW)
    finally:
        client.shutdown()


def test_login_over_starttls_and_imaps(srv: PostofficeServer) -> None:
    for client in (starttls(srv), imaps(srv)):
        assert "AUTH=PLAIN" not in client.capabilities or client.state == "AUTH"
        typ, _data = client.noop()
        assert typ == "OK"
        assert client.logout()[0] == "BYE"


def test_wrong_password_is_refused(srv: PostofficeServer) -> None:
    client = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=context(srv))
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.login(BOB, "wrong")
    client.shutdown()


def test_authenticate_plain(srv: PostofficeServer) -> None:
    client = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=context(srv))
    typ, _ = client.authenticate("PLAIN", lambda _c: f"\0{ALICE}\0{ALICE_PW}".encode())
    assert typ == "OK"
    client.logout()


def test_folders_list_create_rename_delete(srv: PostofficeServer) -> None:
    client = imaps(srv)
    typ, lines = client.list()
    text = b"\n".join(lines).decode()
    assert typ == "OK"
    assert '"." "INBOX"' in text
    assert "\\Sent" in text and "\\Trash" in text
    assert client.create("Work.Projects")[0] == "OK"
    assert client.create("Work.Projects")[0] == "NO"
    _typ, lines = client.list('""', "Work.%")
    assert any(b"Work.Projects" in line for line in lines)
    assert client.rename("Work.Projects", "Work.Done")[0] == "OK"
    _typ, lines = client.list('""', "Work*")
    names = b"\n".join(lines)
    assert b"Work.Done" in names and b"Work.Projects" not in names
    assert client.subscribe("Work.Done")[0] == "OK"
    _typ, lines = client.lsub('""', "*")
    assert any(b"Work.Done" in line for line in lines)
    assert client.delete("Work.Done")[0] == "OK"
    _typ, lines = client.list('""', "Work*")
    assert b"Work.Done" not in b"\n".join(line or b"" for line in lines)
    _typ, data = client.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
    assert b"MESSAGES" in data[0]
    client.logout()


def test_smtp_delivery_select_fetch_store_expunge(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    deliver_smtp(srv, "first")
    deliver_smtp(srv, "second")
    assert wait_for(lambda: len(srv.messages(ALICE)) == 2)
    client = starttls(srv)
    typ, data = client.select("INBOX")
    assert typ == "OK" and data == [b"2"]
    assert client.untagged_responses.get("UIDVALIDITY")
    typ, data = client.fetch("1:2", "(UID FLAGS RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER])")
    assert typ == "OK"
    header = data[0][1]
    assert b"Subject: first" in header and header.endswith(b"\r\n\r\n")
    typ, data = client.fetch("2", "(BODY[])")
    body = data[0][1]
    assert b"Subject: second" in body and b"Hi there\r\n" in body
    _typ, data = client.fetch("2", "(FLAGS)")
    assert b"\\Seen" in data[0]
    _typ, data = client.fetch("1", "(BODY.PEEK[TEXT]<0.2>)")
    assert data[0][1] == b"Hi"
    typ, data = client.search(None, "UNSEEN")
    assert data == [b"1"]
    typ, data = client.uid("SEARCH", "ALL")
    assert len(data[0].split()) == 2
    assert client.store("1", "+FLAGS", "(\\Deleted \\Flagged)")[0] == "OK"
    assert any(":2," in p.name and "T" in p.name.split(":2,")[1] for p in srv.messages(ALICE))
    typ, data = client.expunge()
    assert typ == "OK" and data == [b"1"]
    assert len(srv.messages(ALICE)) == 1
    client.logout()


def test_append_copy_move(srv: PostofficeServer) -> None:
    client = imaps(srv)
    typ, data = client.append("Drafts", "(\\Draft \\Seen)", None, MESSAGE)
    assert typ == "OK" and b"APPENDUID" in data[0]
    client.select("Drafts")
    typ, data = client.fetch("*", "(FLAGS BODY.PEEK[])")
    assert b"\\Draft" in data[0][0] and data[0][1] == MESSAGE
    typ, data = client.copy("1:*", "Archive")
    assert typ == "OK" and b"COPYUID" in data[0]
    typ, data = client.uid("MOVE", "1:*", "Trash")
    assert typ == "OK"
    assert client.select("Drafts")[1] == [b"0"]
    assert int(client.select("Trash")[1][0]) >= 1
    assert int(client.select("Archive")[1][0]) >= 1
    assert client.copy("1", "Nowhere")[0] == "NO"
    client.logout()


def test_pop3_dele_shows_as_expunge(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    deliver_smtp(srv, "for-pop")
    assert wait_for(lambda: len(srv.messages(ALICE)) == 1)
    client = imaps(srv)
    assert client.select("INBOX")[1] == [b"1"]
    pop = poplib.POP3_SSL("127.0.0.1", srv.ports["pop3s"], context=context(srv))
    pop.user(ALICE)
    pop.pass_(ALICE_PW)
    pop.dele(1)
    pop.quit()
    client.noop()
    assert client.untagged_responses.get("EXPUNGE") == [b"1"]
    client.logout()


def test_idle_sees_new_mail_within_a_second(srv: PostofficeServer) -> None:
    empty_inbox(srv, ALICE)
    sock_client = imaps(srv)
    sock_client.select("INBOX")
    tag = sock_client._new_tag().decode()
    sock_client.send(f"{tag} IDLE\r\n".encode())
    assert sock_client.readline().startswith(b"+")
    started = time.monotonic()
    deliver_smtp(srv, "idle")
    line = sock_client.readline()
    took = time.monotonic() - started
    assert re.match(rb"\* \d+ EXISTS", line), line
    assert took < 2.0, took  # the delivery itself included
    # imaplib is a rev1 client: the new message is \\Recent to it (RFC 3501 §7.3.2).
    assert re.match(rb"\* 1 RECENT", sock_client.readline())
    sock_client.send(b"DONE\r\n")
    assert sock_client.readline().startswith(tag.encode() + b" OK")
    sock_client.logout()


def test_raw_greeting_and_capability(srv: PostofficeServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.ports["imap"]), timeout=10) as sock:
        greeting = sock.recv(4096)
        assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS")
        sock.sendall(b"a1 NAMESPACE\r\na2 LOGOUT\r\n")
        data = b""
        while b"a2 OK" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        assert b"a1 BAD" in data or b'* NAMESPACE (("" "."))' in data
        assert b"* BYE" in data


def test_curl_lists_and_fetches_over_starttls(
    srv: PostofficeServer, require_program: Callable[[str], str]
) -> None:
    curl = require_program("curl")  # in CI a missing program fails, never skips
    empty_inbox(srv, ALICE)
    deliver_smtp(srv, "via-curl")
    assert wait_for(lambda: len(srv.messages(ALICE)) == 1)
    base = f"imap://127.0.0.1:{srv.ports['imap']}"
    common = [curl, "-sS", "--ssl-reqd", "--cacert", str(srv.data_dir / "tls" / "cert.pem")]
    common += ["-u", f"{ALICE}:{ALICE_PW}"]
    listing = subprocess.run([*common, f"{base}/"], capture_output=True, timeout=30, check=True)
    assert b"INBOX" in listing.stdout
    uid_url = f"{base}/INBOX;MAILINDEX=1"
    fetched = subprocess.run([*common, uid_url], capture_output=True, timeout=30, check=True)
    assert b"Subject: via-curl" in fetched.stdout


MULTIPART = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.test, Carol <carol@example.test>\r\n"
    b"Subject: structure\r\n"
    b"Message-ID: <m1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"hello\r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"aGk=\r\n"
    b"--b1--\r\n"
)


def test_envelope_bodystructure_parts_and_binary(srv: PostofficeServer) -> None:
    client = imaps(srv)
    typ, _data = client.append("Archive", None, None, MULTIPART)
    assert typ == "OK"
    client.select("Archive", readonly=True)
    typ, data = client.fetch("*", "(ENVELOPE BODYSTRUCTURE)")
    assert typ == "OK", data
    text = b" ".join(d if isinstance(d, bytes) else b" ".join(d) for d in data)
    assert b'"structure"' in text and b'"<m1@example.test>"' in text
    assert b'("Carol" NIL "carol" "example.test")' in text
    assert b'("TEXT" "PLAIN" ("CHARSET" "utf-8")' in text.upper().replace(b'"UTF-8"', b'"utf-8"')
    assert b'"MIXED"' in text.upper()
    typ, data = client.fetch("*", "(BODY.PEEK[1] BODY.PEEK[2.MIME] BINARY.PEEK[2])")
    assert typ == "OK", data
    values = [d[1] for d in data if isinstance(d, tuple)]
    assert values[0] == b"hello"
    assert values[1].startswith(b"Content-Type: application/octet-stream")
    assert values[2] == b"hi"
    client.logout()
