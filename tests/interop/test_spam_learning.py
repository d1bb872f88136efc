"""IMAP MOVE/COPY into Junk trains rspamd as spam, out of Junk as ham
([filters] rspamd_controller), checked in the real controller's /stat."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import make_server
from tests.support.imap import ALICE, starttls
from tests.support.rspamd import CONTROLLER_PASSWORD, Rspamd
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    server = Rspamd(tmp_path_factory.mktemp("rspamd"), redis=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def srv(tmp_path: Path, rspamd: Rspamd) -> Iterator[PostofficeServer]:
    url = f"http://:{CONTROLLER_PASSWORD}@127.0.0.1:{rspamd.controller_port}"
    server = make_server(tmp_path, filters={"rspamd_controller": url})
    try:
        yield server
    finally:
        server.stop()


def learned(rspamd: Rspamd) -> dict[str, int]:
    """Per bayes statfile, how many messages the controller has learned."""
    request = urllib.request.Request(
        f"{rspamd.controller_url}/stat", headers={"Password": CONTROLLER_PASSWORD}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        stat = json.load(reply)
    return {s["symbol"]: int(s["revision"]) for s in stat["statfiles"]}


def wait_learned(rspamd: Rspamd, symbol: str, at_least: int) -> dict[str, int]:
    deadline = time.monotonic() + 30
    while True:
        counts = learned(rspamd)
        if counts.get(symbol, 0) >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.3)


def message(n: int) -> bytes:
    words = " ".join(f"word{n}x{i}" for i in range(60))
    return (
        f"From: someone{n}@example.test\r\nTo: {ALICE}\r\nSubject: offer {n}\r\n"
        f"Message-ID: <learn-{n}-{time.time_ns()}@example.test>\r\n\r\n{words}\r\n"
    ).encode()


def test_move_into_junk_learns_spam_and_out_learns_ham(
    srv: PostofficeServer, rspamd: Rspamd
) -> None:
    before = learned(rspamd)
    client = starttls(srv)
    try:
        for n in range(2):
            assert client.append("INBOX", "", None, message(n))[0] == "OK"
        client.select("INBOX")
        typ, _ = client.uid("MOVE", "1:*", "Junk")
        assert typ == "OK"
        spam = wait_learned(rspamd, "BAYES_SPAM", before.get("BAYES_SPAM", 0) + 2)
        assert spam["BAYES_SPAM"] == before.get("BAYES_SPAM", 0) + 2
        assert spam.get("BAYES_HAM", 0) == before.get("BAYES_HAM", 0)
        # out of Junk: ham; COPY counts as well
        client.select("Junk")
        typ, _ = client.uid("COPY", "1:*", "INBOX")
        assert typ == "OK"
        ham = wait_learned(rspamd, "BAYES_HAM", before.get("BAYES_HAM", 0) + 2)
        assert ham["BAYES_HAM"] == before.get("BAYES_HAM", 0) + 2
        # to Trash is neither
        typ, _ = client.uid("MOVE", "1:*", "Trash")
        assert typ == "OK"
        time.sleep(1)
        assert learned(rspamd) == ham
    finally:
        client.logout()


def test_unreachable_controller_never_blocks_imap(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = make_server(tmp_path, filters={"rspamd_controller": url})
    try:
        client = starttls(server)
        try:
            client.append("INBOX", "", None, message(9))
            client.select("INBOX")
            started = time.monotonic()
            assert client.uid("MOVE", "1", "Junk")[0] == "OK"
            assert time.monotonic() - started < 5
            assert client.select("Junk")[1] == [b"1"]
        finally:
            client.logout()
    finally:
        server.stop()
