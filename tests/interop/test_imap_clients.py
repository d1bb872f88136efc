"""Real IMAP clients from Debian against the real server.

mbsync (isync), fetchmail, curl imaps://, offlineimap3 and getmail6.

Each client runs as its user runs it, over TLS that trusts the server's own
self-signed certificate (data_dir/tls/cert.pem; it names 127.0.0.1).  The
assertions are on what ended up on each side: the local Maildir (files,
flags in the names) and the server as Python's imaplib sees it (UIDs,
flags), so a second sync that moves nothing, or a UID that changes under a
client, shows.  Outside CI a missing program skips its test; in CI (``CI``
set) it fails.
"""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import MDA, wait_for
from tests.support.server import PostofficeServer

pytestmark = pytest.mark.interop

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
Program = Callable[[str], str]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostofficeServer]:
    srv = PostofficeServer(tmp_path / "server")
    srv.add_user(ALICE, ALICE_PW)
    srv.start()
    yield srv
    srv.stop()


def cert(srv: PostofficeServer) -> str:
    return str(srv.data_dir / "tls" / "cert.pem")


def imap(srv: PostofficeServer) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=cert(srv))
    client = imaplib.IMAP4_SSL("127.0.0.1", srv.ports["imaps"], ssl_context=context, timeout=15)
    client.login(ALICE, ALICE_PW)
    return client


def message(subject: str) -> bytes:
    return f"From: bob@example.test\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\n{subject} body\r\n".encode()


def append(srv: PostofficeServer, folder: str, *subjects: str) -> None:
    client = imap(srv)
    for subject in subjects:
        typ, data = client.append(folder, None, None, message(subject))
        assert typ == "OK", data
    client.logout()


FETCHED = re.compile(rb"UID (\d+)|FLAGS \(([^)]*)\)")


def server_view(
    srv: PostofficeServer, folder: str = "INBOX"
) -> dict[str, tuple[int, frozenset[str]]]:
    """Subject -> (UID, flags) of what the server holds in ``folder``."""
    client = imap(srv)
    typ, _ = client.select(folder, readonly=True)
    assert typ == "OK"
    typ, data = client.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    client.logout()
    view: dict[str, tuple[int, frozenset[str]]] = {}
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid, flags = 0, frozenset[str]()
        for found_uid, found_flags in FETCHED.findall(item[0]):
            uid = int(found_uid) if found_uid else uid
            flags = frozenset(found_flags.decode().split()) if found_flags else flags
        subject = item[1].decode().split(":", 1)[1].strip()
        assert subject not in view, f"{subject} twice on the server"
        view[subject] = (uid, flags)
    return view


def subjects(srv: PostofficeServer, folder: str = "INBOX") -> set[str]:
    return set(server_view(srv, folder))


def local_view(maildir: Path) -> dict[str, Path]:
    """Subject -> file of a local Maildir folder (new/ and cur/)."""
    view: dict[str, Path] = {}
    for sub in ("new", "cur"):
        for path in sorted((maildir / sub).glob("*")) if (maildir / sub).is_dir() else []:
            head = path.read_bytes().split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
            match = re.search(rb"^Subject: (.*?)\r?$", head, re.MULTILINE)
            assert match, path
            subject = match.group(1).decode()
            assert subject not in view, f"{subject} twice in {maildir}"
            view[subject] = path
    return view


def maildir_flags(path: Path) -> str:
    """The flag letters of a Maildir file name (``...:2,FS`` -> ``FS``)."""
    return path.name.split(":2,", 1)[1] if ":2," in path.name else ""


def run(args: list[str], home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# --- mbsync (isync) ----------------------------------------------------------------


def mbsync_rc(srv: PostofficeServer, home: Path, local: Path) -> Path:
    # CertificateFile: mbsync trusts the server's certificate by it (and
    # checks the chain and host name against it), no skipping of verification.
    rc = home / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount po\nHost 127.0.0.1\nPort {srv.ports['imaps']}\n"
        f"User {ALICE}\nPass {ALICE_PW}\nSSLType IMAPS\nCertificateFile {cert(srv)}\n\n"
        "IMAPStore po-far\nAccount po\n\n"
        f"MaildirStore po-near\nPath {local}/\nInbox {local}/INBOX\nSubFolders Verbatim\n\n"
        "Channel po\nFar :po-far:\nNear :po-near:\nPatterns INBOX Archive\n"
        "Create Near\nExpunge Both\nSyncState *\n"
    )
    rc.chmod(0o600)
    return rc


def test_mbsync_sync_resync_flags_delete_move_and_restart(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    mbsync = require_program("mbsync")
    home, local = tmp_path / "home", tmp_path / "Mail"
    home.mkdir()
    local.mkdir()
    args = [mbsync, "-c", str(mbsync_rc(server, home, local)), "-a"]
    two_way_sync(server, lambda: run(args, home), local)
    # isync 1.4+ turns COMPRESS=DEFLATE (RFC 4978) on when offered, so every
    # sync ran compressed (the checks above use imaplib, which never does).
    compressed = re.findall(r"imap session .* end=logout compress=deflate", server.log())
    assert len(compressed) >= 7, server.log()


def two_way_sync(
    server: PostofficeServer,
    sync: Callable[[], subprocess.CompletedProcess[str]],
    local: Path,
) -> None:
    """The scenario for a client that keeps local Maildir folders INBOX and
    Archive (under ``local``) in step with the server, both ways; ``sync``
    runs it once."""
    append(server, "INBOX", "one", "two", "three", "four")

    # Full sync: every message, once.
    ok(sync())
    first = local_view(local / "INBOX")
    assert set(first) == {"one", "two", "three", "four"}
    uids = server_view(server)

    # A second sync moves nothing: same local files, same UIDs on the server.
    ok(sync())
    assert local_view(local / "INBOX") == first
    assert server_view(server) == uids

    # Flags both ways: seen+flagged locally, answered on the server.
    path = first["one"]
    path.rename(path.parent.parent / "cur" / (path.name.split(":2,")[0] + ":2,FS"))
    client = imap(server)
    client.select("INBOX")
    assert client.uid("STORE", str(uids["two"][0]), "+FLAGS", "(\\Answered)")[0] == "OK"
    client.logout()
    ok(sync())
    view = server_view(server)
    assert {"\\Seen", "\\Flagged"} <= view["one"][1]
    assert "R" in maildir_flags(local_view(local / "INBOX")["two"])

    # Deletes both ways: a file removed here, a message expunged there.
    local_view(local / "INBOX")["three"].unlink()
    client = imap(server)
    client.select("INBOX")
    client.uid("STORE", str(uids["four"][0]), "+FLAGS", "(\\Deleted)")
    assert client.expunge()[0] == "OK"
    client.logout()
    ok(sync())
    assert subjects(server) == {"one", "two"}
    assert set(local_view(local / "INBOX")) == {"one", "two"}

    # A move on the server (RFC 6851) reaches the local Maildir.
    client = imap(server)
    client.select("INBOX")
    assert client.uid("MOVE", str(uids["two"][0]), "Archive")[0] == "OK"
    client.logout()
    ok(sync())
    assert set(local_view(local / "INBOX")) == {"one"}
    assert set(local_view(local / "Archive")) == {"two"}
    assert subjects(server, "Archive") == {"two"}

    # A move here: the file goes to Archive without the client's UID in its name.
    path = local_view(local / "INBOX")["one"]
    name = re.sub(r",U=\d+", "", path.name)
    path.rename(local / "Archive" / "cur" / name)
    ok(sync())
    assert subjects(server) == set()
    assert subjects(server, "Archive") == {"one", "two"}
    assert {"\\Seen", "\\Flagged"} <= server_view(server, "Archive")["one"][1]
    assert set(local_view(local / "Archive")) == {"one", "two"}

    # kill -9: the next sync after a restart finds the same UIDs, moves nothing.
    append(server, "INBOX", "five")
    ok(sync())
    before = server_view(server), local_view(local / "INBOX"), local_view(local / "Archive")
    server.kill()
    assert sync().returncode != 0  # no server: a failure, not a wipe
    server.start()
    ok(sync())
    after = server_view(server), local_view(local / "INBOX"), local_view(local / "Archive")
    assert after == before


# --- fetchmail (IMAP) --------------------------------------------------------------


def fetchmail_rc(srv: PostofficeServer, home: Path, out: Path, *, keep: bool, idle: bool) -> Path:
    (home / "mda.py").write_text(MDA)
    rc = home / "fetchmailrc"
    # sslcommonname: fetchmail matches the name against DNS names only, and the
    # certificate names localhost besides 127.0.0.1; the chain is checked.
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {srv.ports['imaps']} protocol imap\n"
        f'  user "{ALICE}" there with password "{ALICE_PW}" is "nobody" here\n'
        f'  ssl sslcertck sslcertfile "{cert(srv)}" sslcommonname "localhost"\n'
        f"  {'keep' if keep else 'nokeep'}{' idle' if idle else ''}\n"
        f'  mda "{sys.executable} {home / "mda.py"} {out}"\n'
    )
    rc.chmod(0o600)
    return rc


def fetched(out: Path) -> list[str]:
    subject = re.compile(rb"^Subject: (.*?)\r?$", re.MULTILINE)
    found = [subject.search(path.read_bytes()) for path in sorted(out.iterdir())]
    return [match.group(1).decode() for match in found if match]


def test_fetchmail_imap_fetches_unseen_once_then_deletes(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    fetchmail = require_program("fetchmail")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    keep = fetchmail_rc(server, home, out, keep=True, idle=False)
    append(server, "INBOX", "one", "two")

    # keep: fetchmail takes what is not \Seen and marks it so (RFC 9051 §2.3.2).
    assert run([fetchmail, "-f", str(keep), "--nosyslog"], home).returncode == 0
    assert sorted(fetched(out)) == ["one", "two"]
    view = server_view(server)
    assert all("\\Seen" in flags for _uid, flags in view.values())

    # Again: nothing new (1), nothing fetched twice, UIDs unchanged.
    again = run([fetchmail, "-f", str(keep), "--nosyslog"], home)
    assert again.returncode == 1, again.stdout + again.stderr
    assert len(fetched(out)) == 2
    assert server_view(server) == view

    # nokeep: the new message is fetched, then deleted and expunged.
    append(server, "INBOX", "three")
    delete = fetchmail_rc(server, home, out, keep=False, idle=False)
    assert run([fetchmail, "-f", str(delete), "--nosyslog"], home).returncode == 0
    assert sorted(fetched(out)) == ["one", "three", "two"]
    assert subjects(server) == {"one", "two"}


def test_fetchmail_imap_idle_and_reconnect_after_kill(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    fetchmail = require_program("fetchmail")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    rc = fetchmail_rc(server, home, out, keep=True, idle=True)
    # A daemon polling every 20 s, in the foreground so the test owns its PID.
    # With ``idle`` it waits in IDLE (RFC 2177) between fetches, so new mail
    # comes well before the next poll would fetch it.
    log = home / "fetchmail.log"
    with log.open("wb") as stderr:
        daemon = subprocess.Popen(
            [fetchmail, "-f", str(rc), "--nosyslog", "-N", "-d", "20", "-v"],
            stdout=stderr,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        )
    try:
        append(server, "INBOX", "one")
        assert wait_for(lambda: fetched(out) == ["one"], timeout=30), log.read_text()
        idling = re.compile(r"IMAP> A\d+ IDLE\n.*IMAP< \+ ", re.DOTALL)
        assert wait_for(lambda: bool(idling.search(log.read_text()))), log.read_text()
        append(server, "INBOX", "two")  # arrives while fetchmail idles
        assert wait_for(lambda: fetched(out) == ["one", "two"], timeout=10), log.read_text()
        # fetchmail marks "two" \Seen only after handing it on; a kill before
        # that STORE's OK makes it fetch "two" again (at least once, its rule):
        # wait until it idles again, its flag stored.
        idle_again = re.compile(r"IMAP< \+ idling")
        assert wait_for(lambda: len(idle_again.findall(log.read_text())) >= 2), log.read_text()

        # kill -9 under the idling client: it polls again (after its 20 s) and
        # fetches what came meanwhile, and nothing twice.
        server.kill()
        server.start()
        append(server, "INBOX", "three")
        assert wait_for(lambda: fetched(out) == ["one", "two", "three"], timeout=60), (
            log.read_text()
        )
    finally:
        daemon.terminate()
        daemon.wait(10)


# --- curl imaps:// -----------------------------------------------------------------


def test_curl_imaps_append_fetch_flags_move_delete_and_restart(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    curl = require_program("curl")
    base = f"imaps://127.0.0.1:{server.ports['imaps']}"

    def call(*args: str) -> str:
        # --cacert: curl checks the chain and that the certificate names 127.0.0.1.
        common = [curl, "-sS", "--max-time", "30", "--cacert", cert(server)]
        return ok(run([*common, "-u", f"{ALICE}:{ALICE_PW}", *args], tmp_path)).stdout

    def uids(folder: str = "INBOX") -> list[int]:
        found = re.search(
            r"^\* SEARCH(.*)$", call("-X", "UID SEARCH ALL", f"{base}/{folder}"), re.M
        )
        assert found
        return [int(uid) for uid in found.group(1).split()]

    for subject in ("one", "two", "three"):  # -T: APPEND (RFC 9051 §6.3.12)
        (tmp_path / subject).write_bytes(message(subject))
        call("-T", str(tmp_path / subject), f"{base}/INBOX")
    assert "INBOX" in call(f"{base}/")

    # Full fetch by UID, then again: the same UIDs give the same bytes.
    first = {uid: call(f"{base}/INBOX;UID={uid}") for uid in uids()}
    assert sorted(re.findall(r"Subject: (\w+)", "".join(first.values()))) == ["one", "three", "two"]
    assert {uid: call(f"{base}/INBOX;UID={uid}") for uid in uids()} == first
    one, two, three = sorted(first)

    call("-X", f"UID STORE {one} +FLAGS (\\Flagged)", f"{base}/INBOX")
    assert "\\Flagged" in server_view(server)["one"][1]

    call("-X", f"UID MOVE {two} Archive", f"{base}/INBOX")
    assert subjects(server, "Archive") == {"two"}

    call("-X", f"UID STORE {three} +FLAGS (\\Deleted)", f"{base}/INBOX")
    call("-X", f"UID EXPUNGE {three}", f"{base}/INBOX")  # RFC 4315 §2.1
    assert uids() == [one]

    server.kill()
    server.start()
    assert uids() == [one]
    assert call(f"{base}/INBOX;UID={one}") == first[one]


# --- offlineimap3 ------------------------------------------------------------------


def offlineimap_rc(srv: PostofficeServer, home: Path, local: Path) -> Path:
    # sslcacertfile: offlineimap checks the chain against the server's own
    # certificate, and the host name against its DNS names only (imaplib2 has
    # no IP address match), so it connects to localhost, a name the
    # certificate carries besides 127.0.0.1.
    rc = home / "offlineimaprc"
    rc.write_text(
        f"[general]\naccounts = po\nmetadata = {home}/metadata\n\n"
        "[Account po]\nlocalrepository = near\nremoterepository = far\n\n"
        f"[Repository near]\ntype = Maildir\nlocalfolders = {local}\n\n"
        f"[Repository far]\ntype = IMAP\nremotehost = localhost\nremoteport = {srv.ports['imaps']}\n"
        f"remoteuser = {ALICE}\nremotepass = {ALICE_PW}\n"
        f"ssl = yes\nsslcacertfile = {cert(srv)}\n"
        "folderfilter = lambda name: name in ('INBOX', 'Archive')\n"
        "usecompression = yes\n"  # COMPRESS=DEFLATE (RFC 4978), imaplib2's own zlib
    )
    return rc


def test_offlineimap_sync_resync_flags_delete_move_and_restart(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    offlineimap = require_program("offlineimap")
    home, local = tmp_path / "home", tmp_path / "Mail"
    home.mkdir()
    local.mkdir()
    args = [offlineimap, "-c", str(offlineimap_rc(server, home, local)), "-o", "-u", "basic"]
    two_way_sync(server, lambda: run(args, home, timeout=90), local)
    assert "compress=deflate" in server.log(), server.log()


# --- getmail6 ----------------------------------------------------------------------


def getmail_rc(srv: PostofficeServer, home: Path, out: Path, *, delete: bool) -> Path:
    (home / "mda.py").write_text(MDA)
    # ca_certs: getmail checks the chain against the server's own certificate
    # (Python's ssl, which matches 127.0.0.1 against the certificate's IP names).
    # An external MDA, not getmail's Maildir: that one refuses to run as root,
    # and CI runs as root; allow_root_commands lets the MDA run there.
    rc = home / ("getmailrc-delete" if delete else "getmailrc")
    rc.write_text(
        f"[retriever]\ntype = SimpleIMAPSSLRetriever\nserver = 127.0.0.1\n"
        f"port = {srv.ports['imaps']}\nusername = {ALICE}\npassword = {ALICE_PW}\n"
        f"ca_certs = {cert(srv)}\nmailboxes = ('INBOX',)\n\n"
        f"[destination]\ntype = MDA_external\npath = {sys.executable}\n"
        f"arguments = ('{home / 'mda.py'}', '{out}')\nallow_root_commands = true\n\n"
        f"[options]\nread_all = false\ndelete = {'true' if delete else 'false'}\n"
    )
    return rc


def test_getmail_fetches_new_once_then_deletes(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    getmail = require_program("getmail")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    keep = getmail_rc(server, home, out, delete=False)
    args = [getmail, "--getmaildir", str(home), "--rcfile", keep.name]
    append(server, "INBOX", "one", "two")

    ok(run(args, home))
    assert sorted(fetched(out)) == ["one", "two"]
    uids = server_view(server)
    ok(run(args, home))  # getmail remembers the UIDs it has taken: nothing again
    assert len(fetched(out)) == 2
    assert server_view(server) == uids

    append(server, "INBOX", "three")
    delete = getmail_rc(server, home, out, delete=True)
    ok(run([getmail, "--getmaildir", str(home), "--rcfile", delete.name], home))
    assert sorted(fetched(out)) == ["one", "three", "two"]
    assert subjects(server) == set()

    # After kill -9: the next run takes only what is new.
    server.kill()
    server.start()
    append(server, "INBOX", "four")
    ok(run(args, home))
    assert sorted(fetched(out)) == ["four", "one", "three", "two"]


# --- IDLE (RFC 2177) in offlineimap3 and getmail6 --------------------------------------


def deliver(srv: PostofficeServer, subject: str) -> None:
    """One message to alice over SMTP, as new mail arrives from outside."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as smtp:
        smtp.sendmail("bob@example.test", [ALICE], message(subject))


def idle_commands(server: PostofficeServer) -> float:
    """How many IDLE commands the server has received (its metrics)."""
    url = f"http://127.0.0.1:{server.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(r'^postoffice_imap_commands_total\{command="IDLE"\} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def idle_daemon(args: list[str], home: Path) -> subprocess.Popen[bytes]:
    """A client left running in the foreground (the test owns its PID),
    its output in home/client.log."""
    with (home / "client.log").open("wb") as log:
        return subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        )


def stop(daemon: subprocess.Popen[bytes]) -> None:
    daemon.terminate()
    try:
        daemon.wait(10)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(10)


def test_offlineimap_idlefolders_takes_mail_delivered_during_idle(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    offlineimap = require_program("offlineimap")
    home, local = tmp_path / "home", tmp_path / "Mail"
    home.mkdir()
    local.mkdir()
    rc = offlineimap_rc(server, home, local)
    # autorefresh (minutes) keeps it running; 5 minutes is far beyond the
    # waits here, so only the IDLE on INBOX can bring the mail in time.
    text = rc.read_text().replace("[Account po]\n", "[Account po]\nautorefresh = 5\n")
    rc.write_text(text + "idlefolders = ['INBOX']\n")
    deliver(server, "one")
    daemon = idle_daemon([offlineimap, "-c", str(rc), "-u", "basic", "-d", "imap"], home)
    log = home / "client.log"
    try:
        assert wait_for(lambda: set(local_view(local / "INBOX")) == {"one"}, timeout=30), (
            log.read_text()
        )
        assert wait_for(lambda: " IDLE" in log.read_text(), timeout=30), log.read_text()
        deliver(server, "two")
        assert wait_for(lambda: set(local_view(local / "INBOX")) == {"one", "two"}, timeout=10), (
            log.read_text()[-3000:]
        )
    finally:
        stop(daemon)


def test_getmail_idle_takes_mail_delivered_during_idle(
    server: PostofficeServer, require_program: Program, tmp_path: Path
) -> None:
    getmail = require_program("getmail")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    rc = getmail_rc(server, home, out, delete=False)
    deliver(server, "one")
    args = [getmail, "--getmaildir", str(home), "--rcfile", rc.name, "--idle", "INBOX", "-v"]
    daemon = idle_daemon(args, home)
    log = home / "client.log"
    try:
        assert wait_for(lambda: fetched(out) == ["one"], timeout=30), log.read_text()
        # getmail --idle: after the fetch it SELECTs INBOX again, then waits in
        # IDLE and fetches again when the server reports new mail (RFC 2177).
        # Mail that arrives before that SELECT is in its answer, so getmail
        # only sees it at its next wake-up (its race, not the server's): "two"
        # comes once the server has the IDLE.
        assert wait_for(lambda: idle_commands(server) >= 1, timeout=30), log.read_text()
        deliver(server, "two")
        assert wait_for(lambda: sorted(fetched(out)) == ["one", "two"], timeout=10), (
            log.read_text()[-3000:]
        )
    finally:
        stop(daemon)
