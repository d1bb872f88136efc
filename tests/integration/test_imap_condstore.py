"""CONDSTORE, QRESYNC (RFC 7162) and QUOTA (RFC 9208) against the real server.

Raw IMAPS transcripts, shaped after the RFCs' examples: imaplib hides the
untagged responses these extensions are about (HIGHESTMODSEQ, MODIFIED,
VANISHED, QUOTA) or cannot send their parameters.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from tests.support.imap import ALICE, ALICE_PW, MESSAGE, context
from tests.support.server import PostofficeServer

QUOTA_KIB = 20


class RawImap:
    """One IMAPS connection: commands in, every response line out."""

    def __init__(self, srv: PostofficeServer) -> None:
        sock = socket.create_connection(("127.0.0.1", srv.ports["imaps"]), timeout=15)
        self.sock = context(srv).wrap_socket(sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.n = 0
        greeting = self.file.readline()
        assert greeting.startswith(b"* OK"), greeting
        self.ok(f'LOGIN "{ALICE}" "{ALICE_PW}"')

    def command(self, text: str, literal: bytes | None = None) -> list[str]:
        """The untagged lines and, last, the tagged one (tag stripped)."""
        self.n += 1
        tag = f"t{self.n}"
        line = f"{tag} {text}".encode()
        if literal is not None:
            line += f" {{{len(literal)}+}}\r\n".encode() + literal
        self.sock.sendall(line + b"\r\n")
        out: list[str] = []
        while True:
            got = self.file.readline()
            assert got, f"connection closed after {out}"
            m = re.search(rb"\{(\d+)\}\r\n$", got)
            if m:
                got += self.file.read(int(m[1])) + self.file.readline()
            text_line = got.decode().rstrip("\r\n")
            if text_line.startswith(tag + " "):
                out.append(text_line[len(tag) + 1 :])
                return out
            out.append(text_line)

    def ok(self, text: str, literal: bytes | None = None) -> list[str]:
        lines = self.command(text, literal)
        assert lines[-1].startswith("OK"), lines
        return lines

    def close(self) -> None:
        self.command("LOGOUT")
        self.sock.close()


def code(lines: list[str], name: str) -> int:
    """The number of response code ``name`` (``[HIGHESTMODSEQ 5]``)."""
    for line in lines:
        m = re.search(rf"\[{name} (\d+)\]", line)
        if m:
            return int(m[1])
    raise AssertionError(f"no {name} in {lines}")


def modseq_of(line: str) -> int:
    m = re.search(r"MODSEQ \((\d+)\)", line)
    assert m, line
    return int(m[1])


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    limits = {"mailbox_quota": QUOTA_KIB * 1024}
    server = PostofficeServer(tmp_path_factory.mktemp("condstore"), sections={"limits": limits})
    server.add_user(ALICE, ALICE_PW)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def imap(srv: PostofficeServer) -> Iterator[RawImap]:
    client = RawImap(srv)
    yield client
    client.close()


def fill(client: RawImap, folder: str, count: int) -> None:
    client.ok(f"CREATE {folder}")
    for _ in range(count):
        client.ok(f"APPEND {folder} ()", MESSAGE)


def test_capabilities_and_enable(imap: RawImap) -> None:
    caps = imap.ok("CAPABILITY")[0].split()
    for cap in ("CONDSTORE", "QRESYNC", "QUOTA", "QUOTA=RES-STORAGE"):
        assert cap in caps
    assert imap.ok("ENABLE CONDSTORE")[0] == "* ENABLED CONDSTORE"
    assert imap.ok("ENABLE CONDSTORE")[0] == "* ENABLED"  # already on (RFC 5161 §3.1)


def test_condstore_select_fetch_store_search_status(imap: RawImap) -> None:
    fill(imap, "Cond", 3)
    # A first SELECT takes the messages' \\Recent (RFC 3501 §2.3.2): the
    # FLAGS below are the stored ones only.
    imap.ok("SELECT Cond")
    imap.ok("UNSELECT")
    # RFC 7162 §3.1.2.1: SELECT (CONDSTORE) answers HIGHESTMODSEQ.
    selected = imap.ok("SELECT Cond (CONDSTORE)")
    start = code(selected, "HIGHESTMODSEQ")
    # §3.1.3: STORE's FETCH responses carry the new MODSEQ.
    stored = imap.ok("STORE 2 +FLAGS (\\Flagged)")
    assert re.fullmatch(r"\* 2 FETCH \(FLAGS \(\\Flagged\) MODSEQ \(\d+\)\)", stored[0]), stored
    flagged = modseq_of(stored[0])
    assert flagged > start
    # §3.1.4.1: FETCH (CHANGEDSINCE) gives only what changed, with MODSEQ.
    fetched = imap.ok(f"FETCH 1:* (FLAGS) (CHANGEDSINCE {start})")
    assert fetched[:-1] == [f"* 2 FETCH (FLAGS (\\Flagged) MODSEQ ({flagged}))"]
    # FETCH MODSEQ names the item itself.
    assert f"MODSEQ ({flagged})" in imap.ok("FETCH 2 (MODSEQ)")[0]
    # §3.1.3: a conditional STORE fails for what changed since: [MODIFIED]
    # with sequence numbers, UIDs for UID STORE; the rest is stored.
    cond = imap.ok(f"STORE 1:3 (UNCHANGEDSINCE {start}) +FLAGS (\\Seen)")
    assert cond[-1].startswith("OK [MODIFIED 2]"), cond
    assert {line.split()[1] for line in cond[:-1]} == {"1", "3"}
    uids = [int(x) for x in imap.ok("UID SEARCH ALL")[0].split()[2:]]
    cond = imap.ok(f"UID STORE {uids[1]} (UNCHANGEDSINCE {start}) -FLAGS.SILENT (\\Flagged)")
    assert cond == [f"OK [MODIFIED {uids[1]}] STORE completed"]
    # .SILENT with CONDSTORE still tells the new MODSEQ.
    silent = imap.ok("STORE 1 +FLAGS.SILENT (\\Answered)")
    assert re.fullmatch(r"\* 1 FETCH \(MODSEQ \(\d+\)\)", silent[0]), silent
    # §3.1.5: SEARCH MODSEQ answers the highest mod-sequence found.
    found = imap.ok(f"SEARCH MODSEQ {flagged + 1}")
    highest = modseq_of(silent[0])
    assert found[0] == f"* SEARCH 1 3 (MODSEQ {highest})"
    # §3.1.6: STATUS HIGHESTMODSEQ.
    status = imap.ok("STATUS Cond (HIGHESTMODSEQ MESSAGES)")
    assert status[0] == f'* STATUS "Cond" (HIGHESTMODSEQ {highest} MESSAGES 3)'


def test_qresync_after_another_session_changed_the_folder(srv: PostofficeServer) -> None:
    first = RawImap(srv)
    fill(first, "Resync", 4)
    selected = first.ok("SELECT Resync")
    validity, known = code(selected, "UIDVALIDITY"), code(selected, "HIGHESTMODSEQ")
    uids = [int(x) for x in first.ok("UID SEARCH ALL")[0].split()[2:]]
    first.close()

    # Meanwhile another session expunges one message and flags another.
    other = RawImap(srv)
    other.ok("SELECT Resync")
    other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.ok("EXPUNGE")
    other.ok("STORE 2 +FLAGS.SILENT (\\Flagged)")  # uids[2], now number 2

    # RFC 7162 §3.2.5.1: the client comes back with what it knew.
    back = RawImap(srv)
    assert back.command("SELECT Resync (QRESYNC (1 1))") == ["BAD ENABLE QRESYNC first"]
    assert back.ok("ENABLE QRESYNC")[0] == "* ENABLED QRESYNC"
    lines = back.ok(f"SELECT Resync (QRESYNC ({validity} {known} {uids[0]}:{uids[-1]}))")
    assert f"* VANISHED (EARLIER) {uids[0]}" in lines
    changed = [line for line in lines if " FETCH " in line]
    assert len(changed) == 1, lines
    assert re.fullmatch(
        rf"\* 2 FETCH \(FLAGS \(\\Flagged\) UID {uids[2]} MODSEQ \(\d+\)\)", changed[0]
    )
    assert lines.index(changed[0]) > lines.index(f"* VANISHED (EARLIER) {uids[0]}")
    # A wrong UIDVALIDITY: an ordinary SELECT, nothing resynchronised.
    plain = back.ok(f"SELECT Resync (QRESYNC ({validity + 1} {known}))")
    assert not any("VANISHED" in line or "FETCH" in line for line in plain), plain

    # §3.2.10: with QRESYNC on, another session's expunge is VANISHED, not EXPUNGE.
    other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")  # uids[1]
    other.ok("EXPUNGE")
    noop = back.ok("NOOP")
    assert f"* VANISHED {uids[1]}" in noop and not any("EXPUNGE" in x for x in noop[:-1])
    # §3.2.6: UID FETCH (CHANGEDSINCE VANISHED) lists the expunged UIDs first.
    fetched = back.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {known} VANISHED)")
    assert fetched[0] == f"* VANISHED (EARLIER) {uids[0]}:{uids[1]}"
    assert len(fetched) == 3 and f"UID {uids[2]}" in fetched[1]
    # Our own EXPUNGE is told as VANISHED too.
    back.ok(f"UID STORE {uids[3]} +FLAGS.SILENT (\\Deleted)")
    assert back.ok("EXPUNGE")[0] == f"* VANISHED {uids[3]}"
    for client in (other, back):
        client.close()


def test_quota_and_overquota(srv: PostofficeServer, imap: RawImap) -> None:
    # RFC 9208 §4.3: INBOX's root is "", its STORAGE in KiB.
    lines = imap.ok("GETQUOTAROOT INBOX")
    assert lines[0] == '* QUOTAROOT "INBOX" ""'
    m = re.fullmatch(rf'\* QUOTA "" \(STORAGE (\d+) {QUOTA_KIB}\)', lines[1])
    assert m, lines
    shown = srv.cli("user", "quota", ALICE).stdout
    cli = re.search(r": (\d+) bytes", shown)
    assert cli, shown
    assert int(m[1]) == int(cli[1]) // 1024
    assert imap.ok('GETQUOTA ""')[0] == lines[1]
    assert imap.command('GETQUOTA "other"')[-1].startswith("NO [NONEXISTENT]")
    # §4.2 (RFC 5530): what would pass the quota is refused, nothing stored.
    big = MESSAGE + b"x" * (QUOTA_KIB * 1024) + b"\r\n"
    assert imap.command("APPEND INBOX ()", big)[-1].startswith("NO [OVERQUOTA]")
    imap.ok("CREATE Quota")
    piece = MESSAGE + b"y" * 12_000 + b"\r\n"
    imap.ok("APPEND Quota ()", piece)
    imap.ok("SELECT Quota")
    assert imap.command("COPY 1 INBOX")[-1].startswith("NO [OVERQUOTA]")
    # MOVE stays in the one quota root: allowed even when a COPY is not.
    imap.ok("MOVE 1 INBOX")
    assert "Traceback" not in srv.log()
