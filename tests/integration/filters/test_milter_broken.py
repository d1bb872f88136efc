"""A milter that hangs, sends garbage or closes mid-body gives its
default_action, and the spooled message is left as it was."""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import pytest

from postoffice.filters import verdicts as v
from tests.integration.filters.milter_support import broken_milter, settings, spool, transaction
from tests.support.helpers import ALICE, make_server

HEADERS = [("From", "a@example.test"), ("Subject", "hello")]
BODY = b"line one\nline two\n" * 5000  # several BODY packets


def test_good_milter_adds_its_header(tmp_path: Path) -> None:
    message = spool(tmp_path, HEADERS, BODY)
    with broken_milter("good") as address:
        results = asyncio.run(transaction(address, message))
    assert [r.verdict for r in results] == [v.ACCEPT] * 5
    assert results[-1].modifications == (v.AddHeader("X-Broken-Milter", "no"),)


def test_unix_socket(tmp_path: Path) -> None:
    message = spool(tmp_path, HEADERS, b"short\n")
    with broken_milter("good", tmp_path / "milter.sock") as address:
        results = asyncio.run(transaction(address, message))
    assert results[-1].modifications == (v.AddHeader("X-Broken-Milter", "no"),)


@pytest.mark.parametrize("mode", ["hang", "garbage", "close", "huge"])
@pytest.mark.parametrize("action", ["tempfail", "accept", "reject"])
def test_broken_milter_gets_default_action(tmp_path: Path, mode: str, action: str) -> None:
    message = spool(tmp_path, HEADERS, BODY)
    before = message.path.read_bytes()
    started = time.monotonic()
    with broken_milter(mode) as address:
        results = asyncio.run(transaction(settings(address, action, timeout=1.0), message))
    assert time.monotonic() - started < 10
    # the envelope stages were answered by the milter itself
    assert [r.verdict for r in results[:-1]] == [v.ACCEPT] * 4
    assert results[-1] == v.FilterResult(v.default_verdict(action, f"milter {address}"))
    assert message.path.read_bytes() == before  # nothing lost or changed


def test_unreachable_milter_gives_default_action_at_every_stage(tmp_path: Path) -> None:
    message = spool(tmp_path, HEADERS, b"x\n")
    with broken_milter("good") as address:
        pass  # stopped: its port now refuses
    results = asyncio.run(transaction(settings(address, "reject", 1.0), message))
    expected = v.FilterResult(v.default_verdict("reject", f"milter {address}"))
    assert results == [expected] * 5


# --- end to end: the real server with the broken milter in [filters] milters ------


@pytest.mark.parametrize("mode", ["hang", "garbage", "close"])
def test_smtp_broken_milter_tempfails_then_accept_delivers(tmp_path: Path, mode: str) -> None:
    body = b"line\r\n" * 30000  # past the first body packet
    message = b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: x\r\n\r\n" + body
    with broken_milter(mode) as address:
        for action in ("tempfail", "accept"):
            milter = {"address": address, "default_action": action, "command_timeout": 1.0}
            root = tmp_path / action
            srv = make_server(root, filters={"milters": [milter]})
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
                    if action == "tempfail":
                        with pytest.raises(smtplib.SMTPDataError) as refused:
                            client.sendmail("bob@example.test", [ALICE], message)
                        assert refused.value.smtp_code == 451
                        assert srv.messages(ALICE) == []  # the client keeps it
                    else:
                        client.sendmail("bob@example.test", [ALICE], message)
                        (path,) = srv.messages(ALICE)
                        assert path.read_bytes().endswith(body.replace(b"\r\n", b"\n"))
            finally:
                srv.stop()
