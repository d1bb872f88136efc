"""IMAP MOVE/COPY into Junk trains rspamd as spam, out of Junk as ham
([filters] rspamd_controller), checked in the real controller's /stat."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import make_server, wait_for
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


def learned(rspamd: Rspamd) -> int:
    """How many messages the controller has learned (its /stat counter,
    updated at each learn; the per-statfile counts lag behind by a
    refresh period)."""
    request = urllib.request.Request(
        f"{rspamd.controller_url}/stat", headers={"Password": CONTROLLER_PASSWORD}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return int(json.load(reply)["learned"])


def wait_learned(rspamd: Rspamd, at_least: int) -> int:
    deadline = time.monotonic() + 30
    while True:
        count = learned(rspamd)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.3)


def answered(srv: PostofficeServer, kind: str) -> int:
    """The server's log lines for rspamd's 200 to /learn<kind>."""
    return srv.log().count(f"learn {kind}: rspamd answered 200")


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
        assert wait_learned(rspamd, before + 2) == before + 2
        assert wait_for(lambda: answered(srv, "spam") == 2, 10)
        assert answered(srv, "ham") == 0
        # out of Junk: ham; COPY counts as well
        client.select("Junk")
        typ, _ = client.uid("COPY", "1:*", "INBOX")
        assert typ == "OK"
        assert wait_learned(rspamd, before + 4) == before + 4
        assert wait_for(lambda: answered(srv, "ham") == 2, 10)
        # to Trash is neither
        typ, _ = client.uid("MOVE", "1:*", "Trash")
        assert typ == "OK"
        time.sleep(1)
        assert learned(rspamd) == before + 4
        assert (answered(srv, "spam"), answered(srv, "ham")) == (2, 2)
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
