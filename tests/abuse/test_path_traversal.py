"""Path traversal through names: RCPT local parts and domains, AUTH and POP3 user names.

A Maildir path is built from a recipient (``data_dir/mail/<domain>/<local>``)
and a POP3 login opens one.  Names with ``../``, ``/``, NUL, backslashes,
encoded dots or too many octets must never name a directory outside the
mail tree or create one: every probe here is refused or lands in a real
mailbox, and afterwards the file tree holds exactly what it held before
plus the delivered messages.  A directory beside the data dir is the bait.
"""

from __future__ import annotations

import base64
import os
import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import ALICE, make_server, raw, tls_context
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.abuse

LOCAL_PARTS = [
    "../../../bait/pwned",
    "..",
    ".",
    "../alice",
    "alice/../../bait",
    "a/b",
    "/etc",
    "..%2f..%2fbait",
    "%2e%2e",
    '"../../../bait/pwned"',
    '"a/b"',
    '"..\\/..\\/bait"',
    "a\\b",
    "alice+../../bait",  # the plus tag is dropped: alice's mailbox, nothing else
    "alice+/x",
    "a" * 65,
    "a" * 1000,
    "~root",
    "alice\x00.evil",
]
DOMAINS = [
    "../bait",
    "example.test/../../bait",
    "..",
    "example.test\x00.evil",
    "a" * 64 + ".test",
    "[../../bait]",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    """A server whose catch-all accepts every valid name at example.test.
    Failed logins are not throttled here: every probe is one."""
    root = tmp_path_factory.mktemp("traversal")
    (root / "bait").mkdir()
    srv = make_server(
        root / "srv",
        limits={"max_recipients": 1000, "max_errors": 1000},
        auth={"throttle_after": 10_000, "throttle_address_failures": 0},
    )
    srv.cli("alias", "add", "@example.test", ALICE)
    yield srv
    srv.stop()


def tree(root: Path) -> set[str]:
    """Every directory and file under ``root``, except message files and logs."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found.update(str(rel / d) for d in dirnames)
        if rel.name not in ("new", "cur", "tmp"):
            found.update(str(rel / f) for f in filenames)
    return found


def test_recipient_names_never_leave_the_mail_tree(server: PostofficeServer) -> None:
    root = server.root.parent
    client = raw(server)
    # Deliver once first, so alice's Maildir exists in the "before" picture.
    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert client.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    assert client.cmd("Subject: first\r\n\r\nx\r\n.")[0] == 250
    before = tree(root) - {"srv/server.log"}

    assert client.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    accepted = []
    probes = [f"{local}@example.test" for local in LOCAL_PARTS]
    probes += [f"alice@{domain}" for domain in DOMAINS]
    for probe in probes:
        code, lines = client.cmd(f"RCPT TO:<{probe}>".encode("utf-8", "surrogateescape"))
        assert code == 250 or 500 <= code < 600, (probe, code, lines)
        if code == 250:
            accepted.append(probe)
    assert client.cmd("DATA")[0] == 354
    assert client.cmd("Subject: traversal\r\n\r\nx\r\n.")[0] == 250
    # Everything accepted went to alice (catch-all or her own plus-address).
    assert accepted and all(p.startswith("alice+") for p in accepted), accepted
    assert len(server.messages(ALICE)) == 2

    after = tree(root) - {"srv/server.log"}
    assert after == before, after ^ before
    assert list((root / "bait").iterdir()) == []


@pytest.mark.parametrize("name", [f"{local}@example.test" for local in LOCAL_PARTS[:12]])
def test_login_names_open_nothing(server: PostofficeServer, name: str) -> None:
    root = server.root.parent
    before = tree(root) - {"srv/server.log"}
    token = base64.b64encode(f"\0{name}\0alice-password-1".encode()).decode()
    smtp = raw(server, "submissions")
    assert smtp.cmd(f"AUTH PLAIN {token}")[0] in (501, 535)
    pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], timeout=15, context=tls_context())
    try:
        with pytest.raises(poplib.error_proto):
            pop.user(name)
            pop.pass_("alice-password-1")
    finally:
        pop.close()
    assert tree(root) - {"srv/server.log"} == before
    assert "Traceback" not in server.log()
