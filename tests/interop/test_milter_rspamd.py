"""rspamd (Debian's package, proxy worker in milter mode) behind our milter
client: GTUBE is refused with rspamd's reply, a clean message gets
rspamd's headers, the "add header" action comes back as X-Spam: Yes."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from postoffice.filters import verdicts as v
from tests.integration.filters.milter_support import spool, transaction
from tests.support.helpers import ALICE, make_server
from tests.support.rspamd import ADD_HEADER_SUBJECT, GTUBE, Rspamd
from tests.support.server import PostofficeServer


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    server = Rspamd(tmp_path_factory.mktemp("rspamd")).start()
    try:
        yield server
    finally:
        server.stop()


def headers(subject: str) -> list[tuple[str, str]]:
    return [
        ("From", "Sender <sender@example.test>"),
        ("To", "rcpt@example.test"),
        ("Subject", subject),
        ("Date", "Sun, 06 Dec 2026 02:00:00 +0000"),
        ("Message-ID", "<milter-test@example.test>"),
    ]


def test_gtube_is_refused_with_rspamds_reply(rspamd: Rspamd, tmp_path: Path) -> None:
    message = spool(tmp_path, headers("test"), b"Hello\n" + GTUBE + b"\n")
    results = asyncio.run(transaction(rspamd.milter_address, message))
    assert [r.verdict for r in results[:-1]] == [v.ACCEPT] * 4
    verdict = results[-1].verdict
    assert isinstance(verdict, v.Reject)
    assert (verdict.code, verdict.enhanced) == (554, "5.7.1")
    assert "Gtube" in verdict.text


def test_clean_message_gets_rspamd_headers(rspamd: Rspamd, tmp_path: Path) -> None:
    body = b"Just a normal message.\n" * 20000  # several body packets
    message = spool(tmp_path, headers("lunch"), body)
    results = asyncio.run(transaction(rspamd.milter_address, message))
    final = results[-1]
    assert final.verdict == v.ACCEPT
    added = {m.name: m.value for m in final.modifications if isinstance(m, v.AddHeader)}
    assert added["X-Rspamd-Queue-Id"] == "Q123ABC"  # our "i" macro
    assert added["X-Spam-Status"].startswith("No, score=")
    assert "X-Spamd-Result" in added
    assert not any(
        isinstance(m, v.ChangeHeader) and m.name == "X-Spam" for m in final.modifications
    )


def test_add_header_action_is_honoured(rspamd: Rspamd, tmp_path: Path) -> None:
    message = spool(tmp_path, headers(f"hi {ADD_HEADER_SUBJECT}"), b"hello\n")
    results = asyncio.run(transaction(rspamd.milter_address, message))
    final = results[-1]
    assert final.verdict == v.ACCEPT
    assert v.ChangeHeader("X-Spam", 1, "Yes") in final.modifications
    added = {m.name: m.value for m in final.modifications if isinstance(m, v.AddHeader)}
    assert "POSTOFFICE_TEST_ADD_HEADER" in added["X-Spamd-Result"]
    assert added["X-Spam-Status"].startswith("Yes")


# --- end to end: the real server with rspamd in [filters] milters -----------------


@pytest.fixture
def srv(tmp_path: Path, rspamd: Rspamd) -> Iterator[PostofficeServer]:
    server = make_server(tmp_path, filters={"milters": [rspamd.milter_address]})
    try:
        yield server
    finally:
        server.stop()


def send(srv: PostofficeServer, subject: str, body: bytes) -> None:
    message = (
        f"From: bob@example.test\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        "Date: Sun, 06 Dec 2026 02:00:00 +0000\r\n"
        "Message-ID: <e2e@example.test>\r\n\r\n"
    ).encode() + body
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=60) as client:
        client.sendmail("bob@example.test", [ALICE], message)


def folder_files(srv: PostofficeServer, folder: str) -> list[Path]:
    root = srv.maildir(ALICE) / folder if folder else srv.maildir(ALICE)
    return [p for sub in ("new", "cur") if (root / sub).is_dir() for p in (root / sub).iterdir()]


def test_smtp_gtube_refused_with_rspamds_reply(srv: PostofficeServer) -> None:
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(srv, "test", GTUBE + b"\r\n")
    assert refused.value.smtp_code == 554
    assert b"Gtube" in refused.value.smtp_error
    assert folder_files(srv, "") == []


def test_smtp_clean_message_delivered_with_rspamd_headers(srv: PostofficeServer) -> None:
    send(srv, "lunch", b"See you at noon.\r\n")
    (path,) = folder_files(srv, "")
    stored = path.read_bytes()
    assert b"\nX-Spamd-Result: " in stored and b"\nX-Spam-Status: No" in stored
    assert folder_files(srv, ".Junk") == []


def test_smtp_add_header_files_in_junk(srv: PostofficeServer) -> None:
    send(srv, f"hi {ADD_HEADER_SUBJECT}", b"buy now\r\n")
    assert folder_files(srv, "") == []
    (path,) = folder_files(srv, ".Junk")
    assert b"\nX-Spam: Yes\n" in path.read_bytes()
