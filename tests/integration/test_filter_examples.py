"""The hook examples of docs/filters.md, loaded as they are written
(docs/examples/hooks/*.py on the server's PYTHONPATH) into a real server,
driven over real SMTP sockets."""

from __future__ import annotations

import http.server
import json
import os
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "hooks"
ALICE, BOB = "alice@example.test", "bob@small.test"


def start(root: Path, hook: str, env: dict[str, str]) -> PostofficeServer:
    srv = PostofficeServer(
        root,
        domains=("example.test", "small.test"),
        sections={"filters": {"hooks": [hook], "hook_timeout": 5}},
    )
    srv.add_user(ALICE, "pw-alice-123")
    srv.add_user(BOB, "pw-bob-1234")
    path = os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])
    srv.start(env={"PYTHONPATH": path, **env})
    return srv


def attempt(srv: PostofficeServer, rcpt: str, body: bytes = b"hi\r\n") -> tuple[int, str]:
    c = RawSmtp("127.0.0.1", srv.ports["smtp"], timeout=15)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        if code != 250:
            return code, " ".join(text)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: example\r\n\r\n" + body + b".\r\n")
        code, text = c.reply()
        return code, " ".join(text)
    finally:
        c.close()


def test_greylist(tmp_path: Path) -> None:
    delay = 1.0
    srv = start(
        tmp_path,
        "greylist:Greylist",
        {"GREYLIST_DB": str(tmp_path / "grey.sqlite3"), "GREYLIST_DELAY": str(delay)},
    )
    try:
        first = time.monotonic()
        code, text = attempt(srv, ALICE)
        assert code == 451 and text.startswith("4.7.1 Greylisted")
        assert attempt(srv, ALICE)[0] == 451  # too soon
        # Another recipient is another triplet: greylisted on its own.
        assert attempt(srv, BOB)[0] == 451
        time.sleep(max(0.0, delay + 0.2 - (time.monotonic() - first)))
        assert attempt(srv, ALICE)[0] == 250
        assert len(srv.messages(ALICE)) == 1
    finally:
        srv.stop()


def test_size_cap(tmp_path: Path) -> None:
    srv = start(tmp_path, "size_cap:SizeCap", {"SIZE_CAPS": "small.test=2000"})
    big = b"x" * 70 + b"\r\n"
    try:
        # Declared SIZE= over the cap: refused at RCPT, before the data.
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as s:
            s.ehlo()
            s.mail("sender@remote.test", ["SIZE=5000"])
            code, text = s.rcpt(BOB)
            assert (code, text[:5]) == (552, b"5.3.4")
            assert s.rcpt(ALICE)[0] == 250  # other domains have no cap
        # Undeclared: refused after the data.
        code, text = attempt(srv, BOB, big * 40)
        assert code == 552 and text.startswith("5.3.4 Message too big for bob@small.test")
        assert attempt(srv, BOB, big * 10)[0] == 250
        assert attempt(srv, ALICE, big * 40)[0] == 250
        assert len(srv.messages(BOB)) == 1 and len(srv.messages(ALICE)) == 1
    finally:
        srv.stop()


class _Receiver(http.server.BaseHTTPRequestHandler):
    posts: list[tuple[str, dict[str, object]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.posts.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, object]]]]]:
    _Receiver.posts = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/mail", _Receiver.posts
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


def test_webhook(tmp_path: Path, receiver: tuple[str, list[tuple[str, dict[str, object]]]]) -> None:
    url, posts = receiver
    srv = start(tmp_path, "webhook:Webhook", {"WEBHOOK_URL": url})
    try:
        code, text = attempt(srv, ALICE)
        assert code == 250
        queue_id = text.rsplit(" ", 1)[1]
        deadline = time.monotonic() + 10
        while not posts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(posts) == 1
        kind, payload = posts[0]
        assert kind == "application/json"
        assert payload["queue_id"] == queue_id
        assert payload["sender"] == "sender@remote.test"
        assert payload["local"] == [ALICE] and payload["remote"] == []
        assert payload["folder"] == "INBOX" and payload["discarded"] is False
        assert payload["client"] == "127.0.0.1"
        # A refused message is not "delivered": no post.
        assert attempt(srv, "nobody@example.test")[0] == 550
        time.sleep(0.3)
        assert len(posts) == 1
    finally:
        srv.stop()
