"""Python hooks ([filters] hooks) in a real server over real SMTP sockets.

Every verdict and modification of filters/verdicts.py goes through the
filtered path (net/smtp_filtering.py) driven by tests/integration/
filter_hooks/verdict_hook.py: replies with their enhanced codes at each
stage, header edits, body replacement, recipients added, deleted and
redirected, sender changed, folders and the Junk folder, discard and
quarantine; a hook that crashes or hangs gives default_action and the
server goes on; a hook that does not load stops serve and check.
"""

from __future__ import annotations

import email
import os
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dns import auth_dns
from tests.support.peers import Dnsmasq
from tests.support.ports import free_port
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

HOOKS_DIR = Path(__file__).parent / "filter_hooks"
ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
ENV = {"PYTHONPATH": os.pathsep.join([str(HOOKS_DIR), os.environ.get("PYTHONPATH", "")])}


def start(root: Path, hooks: list[str], **filters: object) -> PostofficeServer:
    # Remote copies wait in the queue: its smarthost never answers.
    relay = {"smarthost": f"127.0.0.1:{free_port()}", "retry_schedule": [3600]}
    srv = PostofficeServer(
        root,
        sections={"filters": {"hooks": hooks, "hook_timeout": 1.5, **filters}, "relay": relay},
    )
    for user in (ALICE, BOB, CAROL):
        srv.add_user(user, "pw-" + user)
    srv.start(env=ENV)
    return srv


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostofficeServer]:
    server = start(tmp_path_factory.mktemp("hooks"), ["verdict_hook:Scripted"])
    yield server
    server.stop()


def message(*ops: str, subject: str = "hello", body: str = "original body") -> bytes:
    head = "".join(f"X-Test-Op: {op}\r\n" for op in ops)
    return (
        f"From: sender@remote.test\r\nSubject: {subject}\r\n{head}X-Remove-Me: 1\r\n\r\n{body}\r\n"
    ).encode()


def send(
    srv: PostofficeServer, rcpts: list[str], data: bytes, sender: str = "sender@remote.test"
) -> tuple[int, str]:
    c = RawSmtp("127.0.0.1", srv.ports["smtp"], timeout=15)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        code, text = c.cmd(f"MAIL FROM:<{sender}>")
        if code != 250:
            return code, " ".join(text)
        for r in rcpts:
            code, text = c.cmd(f"RCPT TO:<{r}>")
            if code != 250:
                return code, " ".join(text)
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        code, text = c.reply()
        c.cmd("QUIT")
        return code, " ".join(text)
    finally:
        c.close()


def new_messages(srv: PostofficeServer, address: str, folder: str = "") -> list[Path]:
    md = srv.maildir(address) / folder if folder else srv.maildir(address)
    return sorted(p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir())


def latest(srv: PostofficeServer, address: str, folder: str = "") -> email.message.Message:
    files = new_messages(srv, address, folder)
    assert files, f"nothing in {address} {folder}"
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    return email.message_from_bytes(newest.read_bytes())


def count(srv: PostofficeServer, address: str, folder: str = "") -> int:
    return len(new_messages(srv, address, folder))


# --- stages before the data ---------------------------------------------------------
def test_helo_reject_is_the_reply_to_ehlo(srv: PostofficeServer) -> None:
    c = RawSmtp("127.0.0.1", srv.ports["smtp"])
    assert c.reply()[0] == 220
    assert c.cmd("EHLO refuse.example") == (550, ["5.7.1 no such HELO here"])
    assert c.cmd("EHLO fine.example")[0] == 250
    c.close()


def test_mail_and_rcpt_verdicts_with_enhanced_codes(srv: PostofficeServer) -> None:
    before = count(srv, ALICE)
    assert send(srv, [ALICE], message(), sender="reject@remote.test") == (
        553,
        "5.7.27 reject refused by hook",
    )
    assert send(srv, [ALICE], message(), sender="tempfail@remote.test") == (
        452,
        "4.2.1 tempfail later",
    )
    c = RawSmtp("127.0.0.1", srv.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<bob+reject@example.test>") == (553, ["5.7.27 reject refused by hook"])
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(message(subject="one of two") + b".\r\n")
    code, _ = c.reply()
    c.close()
    assert code == 250
    # The refused recipient took nothing from the envelope: alice alone got it.
    assert count(srv, ALICE) == before + 1
    assert latest(srv, ALICE)["Subject"] == "one of two"


def test_discard_at_rcpt_says_250_and_stores_nothing(srv: PostofficeServer) -> None:
    before, bob = count(srv, ALICE), count(srv, BOB)
    code, _ = send(srv, [ALICE], message(), sender="discard@remote.test")
    assert code == 250
    code, _ = send(srv, [ALICE, "bob+discard@example.test"], message())
    assert code == 250
    assert count(srv, ALICE) == before and count(srv, BOB) == bob
    assert "filter discard" in srv.log()


def test_quarantine_at_rcpt_files_in_junk(srv: PostofficeServer) -> None:
    inbox = count(srv, BOB)
    assert send(srv, ["bob+quarantine@example.test"], message(subject="rq"))[0] == 250
    assert count(srv, BOB) == inbox
    assert latest(srv, BOB, ".Junk")["X-Postoffice-Quarantine"] == "asked to at rcpt"


# --- the message stage: every modification ------------------------------------------
def test_headers_added_inserted_changed_deleted(srv: PostofficeServer) -> None:
    code, _ = send(srv, [ALICE], message("add v1", "insert t0", "change new subject", "delete"))
    assert code == 250
    msg = latest(srv, ALICE)
    assert msg["X-Hook-Added"] == "v1"
    assert msg["Subject"] == "new subject"
    assert msg["X-Remove-Me"] is None
    names = [k for k, _ in msg.items()]
    # Inserted on top: before Return-Path's successor, our Received:.
    assert names.index("X-Hook-Top") < names.index("Received")
    assert names.index("X-Hook-Added") > names.index("Subject")


def test_bdat_goes_through_the_filters(srv: PostofficeServer) -> None:
    data = message("add via-bdat", subject="chunked")
    c = RawSmtp("127.0.0.1", srv.ports["smtp"], timeout=15)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<sender@remote.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    half = len(data) // 2
    c.send(f"BDAT {half}\r\n".encode() + data[:half])
    assert c.reply()[0] == 250
    c.send(f"BDAT {len(data) - half} LAST\r\n".encode() + data[half:])
    code, _ = c.reply()
    c.close()
    assert code == 250
    msg = latest(srv, ALICE)
    assert msg["Subject"] == "chunked" and msg["X-Hook-Added"] == "via-bdat"


def test_body_replaced(srv: PostofficeServer) -> None:
    assert send(srv, [ALICE], message("body replaced-by-hook"))[0] == 250
    msg = latest(srv, ALICE)
    assert msg.get_payload().strip() == "replaced-by-hook"


def test_recipient_added_and_deleted(srv: PostofficeServer) -> None:
    b, c = count(srv, BOB), count(srv, CAROL)
    assert send(srv, [ALICE, CAROL], message(f"add-rcpt {BOB}", f"del-rcpt {CAROL}"))[0] == 250
    assert count(srv, BOB) == b + 1 and count(srv, CAROL) == c


def test_redirect_and_sender_change(srv: PostofficeServer) -> None:
    a, c = count(srv, ALICE), count(srv, CAROL)
    data = message(f"redirect {CAROL}", "sender changed@remote.test", subject="redirected")
    assert send(srv, [ALICE], data)[0] == 250
    assert count(srv, ALICE) == a and count(srv, CAROL) == c + 1
    msg = latest(srv, CAROL)
    assert msg["Subject"] == "redirected"
    assert msg["Return-Path"] == "<changed@remote.test>"


def test_deliver_to_folder(srv: PostofficeServer) -> None:
    inbox = count(srv, ALICE)
    assert send(srv, [ALICE], message("folder Lists", subject="to a folder"))[0] == 250
    assert count(srv, ALICE) == inbox
    assert latest(srv, ALICE, ".Lists")["Subject"] == "to a folder"


def test_quarantine_goes_to_junk(srv: PostofficeServer) -> None:
    inbox = count(srv, BOB)
    assert send(srv, [BOB], message("quarantine", subject="q"))[0] == 250
    assert count(srv, BOB) == inbox
    msg = latest(srv, BOB, ".Junk")
    assert msg["Subject"] == "q" and msg["X-Postoffice-Quarantine"] == "hook said so"


def test_spam_header_files_in_junk(srv: PostofficeServer) -> None:
    inbox = count(srv, CAROL)
    assert send(srv, [CAROL], message("spam", subject="spammy"))[0] == 250
    assert count(srv, CAROL) == inbox
    msg = latest(srv, CAROL, ".Junk")
    assert msg["Subject"] == "spammy" and msg["X-Spam"] == "Yes"


def test_rspamd_action_header_already_in_message_files_in_junk(srv: PostofficeServer) -> None:
    data = b"Subject: rs\r\nX-Spam-Action: rewrite subject\r\n\r\nbody\r\n"
    assert send(srv, [CAROL], data)[0] == 250
    assert latest(srv, CAROL, ".Junk")["Subject"] == "rs"


def test_message_reject_tempfail_discard(srv: PostofficeServer) -> None:
    before = count(srv, ALICE)
    assert send(srv, [ALICE], message("reject")) == (554, "5.7.28 content refused by hook")
    assert send(srv, [ALICE], message("tempfail")) == (451, "4.7.29 content later")
    code, text = send(srv, [ALICE], message("discard"))
    assert code == 250 and "queued as" in text
    assert count(srv, ALICE) == before
    assert not list((srv.data_dir / "spool").iterdir())  # no spool file left behind


def test_250_means_the_file_is_in_the_maildir(srv: PostofficeServer) -> None:
    code, text = send(srv, [ALICE], message("add durable", subject="durable"))
    assert code == 250
    queue_id = text.rsplit(" ", 1)[1]
    # Read the moment the reply came: already published in new/, not a tmp/ file.
    files = [p for p in new_messages(srv, ALICE) if queue_id.encode() in p.read_bytes()]
    assert len(files) == 1 and files[0].parent.name == "new"
    assert email.message_from_bytes(files[0].read_bytes())["X-Hook-Added"] == "durable"


def test_remote_recipient_added_goes_to_the_queue_before_250(srv: PostofficeServer) -> None:
    code, text = send(srv, [ALICE], message("add-rcpt far@remote.test", "add queued"))
    assert code == 250
    queue_id = text.rsplit(" ", 1)[1]
    queued = [p for p in (srv.data_dir / "queue").glob("*.msg") if queue_id in p.name]
    assert len(queued) == 1
    content = queued[0].read_bytes()
    assert b"far@remote.test" in content and b"X-Hook-Added: queued" in content
    assert alice_has(srv, queue_id)


def alice_has(srv: PostofficeServer, queue_id: str) -> bool:
    return any(queue_id.encode() in p.read_bytes() for p in new_messages(srv, ALICE))


# --- failing hooks --------------------------------------------------------------------
def test_crash_and_timeout_give_default_action_tempfail(srv: PostofficeServer) -> None:
    before = count(srv, ALICE)
    code, text = send(srv, [ALICE], message("crash"))
    assert code == 451 and text.startswith("4.7.1")
    code, _ = send(srv, [ALICE], message("hang"))
    assert code == 451
    code, _ = send(srv, [ALICE], message("bad-return"))
    assert code == 451
    assert count(srv, ALICE) == before
    log = srv.log()
    assert "RuntimeError: hook crashed on purpose" in log  # the traceback is logged
    assert "Traceback" in log and "TimeoutError" in log
    # The server is still there and delivers.
    assert send(srv, [ALICE], message())[0] == 250


def test_default_action_accept_and_reject(tmp_path: Path) -> None:
    srv = start(tmp_path / "a", ["verdict_hook:CrashEverywhere"], default_action="accept")
    try:
        assert send(srv, [ALICE], message(subject="delivered anyway"))[0] == 250
        assert latest(srv, ALICE)["Subject"] == "delivered anyway"
    finally:
        srv.stop()
    srv = start(tmp_path / "r", ["verdict_hook:CrashEverywhere"], default_action="reject")
    try:
        code, text = send(srv, [ALICE], message())
        assert code == 550 and text.startswith("5.7.1")
    finally:
        srv.stop()


def test_connect_verdict_is_the_greeting(tmp_path: Path) -> None:
    srv = start(tmp_path, ["verdict_hook:RefuseConnect"])
    try:
        c = RawSmtp("127.0.0.1", srv.ports["smtp"])
        assert c.reply() == (421, ["4.7.0 hook says come back later"])
        assert c.closed_by_peer()
        c.close()
    finally:
        srv.stop()


def test_bad_hook_refused_at_start_and_by_check(tmp_path: Path) -> None:
    srv = PostofficeServer(tmp_path, sections={"filters": {"hooks": ["no_such_module:Hook"]}})
    result = srv.cli("check", check=False)
    assert result.returncode == 1
    assert "cannot import 'no_such_module'" in result.stderr
    with pytest.raises(RuntimeError, match="no_such_module"):
        srv.start(env=ENV, timeout=10)


def test_smtplib_submission_through_hooks(srv: PostofficeServer) -> None:
    """A plain client (smtplib) sees nothing different when hooks accept."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=15) as s:
        s.sendmail("x@remote.test", [BOB], message(subject="via smtplib"))
    assert latest(srv, BOB)["Subject"] == "via smtplib"


def test_junk_folder_off_keeps_spam_in_inbox(tmp_path: Path) -> None:
    srv = start(tmp_path, ["verdict_hook:Scripted"], junk_folder=False)
    try:
        assert send(srv, [CAROL], message("spam", subject="kept"))[0] == 250
        assert latest(srv, CAROL)["Subject"] == "kept"
        assert count(srv, CAROL, ".Junk") == 0
    finally:
        srv.stop()


def checked_server(root: Path) -> tuple[PostofficeServer, Dnsmasq]:
    """Hooks on, and the inbound checks (SPF/DKIM/DMARC) judging 127.0.0.0/8
    clients, with a DNS server on loopback: the filtered path with the held
    message of the checks."""
    dns = auth_dns(
        root,
        hosts={"good.client.test": ["127.0.0.7"], "liar.client.test": ["192.0.2.1"]},
        ptr={
            "7.0.0.127.in-addr.arpa": "good.client.test",
            "8.0.0.127.in-addr.arpa": "liar.client.test",
        },
        txt={
            "quarantine.test": "v=spf1 -all",
            "_dmarc.quarantine.test": "v=DMARC1; p=quarantine",
            "reject.test": "v=spf1 -all",
            "_dmarc.reject.test": "v=DMARC1; p=reject",
        },
    ).start()
    relay = {"smarthost": f"127.0.0.1:{free_port()}", "dns_servers": [dns.server]}
    srv = PostofficeServer(
        root / "srv",
        sections={
            "filters": {"hooks": ["verdict_hook:ClientName"]},
            "relay": relay,
            "checks": {"exempt_networks": ["::1/128"]},
        },
    )
    srv.add_user(ALICE, "pw-" + ALICE)
    try:
        srv.start(env=ENV)
    except BaseException:
        dns.stop()
        raise
    return srv, dns


def send_from(srv: PostofficeServer, source: str, sender: str, msg: bytes) -> int:
    """The reply code to the end of DATA, sent from ``source``."""
    with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], source_address=(source, 0), timeout=30) as c:
        try:
            c.sendmail(sender, [ALICE], msg)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
    return 250


def test_client_name_is_forward_confirmed_reverse_dns(tmp_path: Path) -> None:
    # 127.0.0.7's PTR name leads back to it; 127.0.0.8's PTR name claims a
    # name whose address is elsewhere (anyone can write a reverse zone), and
    # 127.0.0.9 has no PTR: both are "unknown" to the filters.
    srv, dns = checked_server(tmp_path)
    try:
        for source, name in (
            ("127.0.0.7", "good.client.test"),
            ("127.0.0.8", "unknown"),
            ("127.0.0.9", "unknown"),
        ):
            assert send_from(srv, source, "x@sender.test", message(subject=source)) == 250
            stored = latest(srv, ALICE)
            assert stored["Subject"] == source
            assert stored["X-Client-Name"] == name, source
    finally:
        srv.stop()
        dns.stop()


def test_inbound_checks_hold_the_message_on_the_filtered_path(tmp_path: Path) -> None:
    # With filters and the checks both on: the Authentication-Results header
    # and the filter's header are both in the one stored copy; DMARC
    # p=quarantine files it in Junk, p=reject refuses it before any filter
    # verdict is stored.
    srv, dns = checked_server(tmp_path)
    try:
        msg = message(subject="from quarantine.test").replace(
            b"From: ", b"From: q@quarantine.test\r\nX-Old-From: ", 1
        )
        assert send_from(srv, "127.0.0.7", "q@quarantine.test", msg) == 250
        stored = latest(srv, ALICE, ".Junk")
        assert stored["Subject"] == "from quarantine.test"
        assert "dmarc=fail" in stored["Authentication-Results"]
        assert stored["X-Postoffice-Quarantine"]
        assert stored["X-Client-Name"] == "good.client.test"
        assert count(srv, ALICE) == 0, "nothing in INBOX"

        msg = message(subject="from reject.test").replace(
            b"From: ", b"From: r@reject.test\r\nX-Old-From: ", 1
        )
        assert send_from(srv, "127.0.0.7", "r@reject.test", msg) == 550
        assert count(srv, ALICE) == 0 and count(srv, ALICE, ".Junk") == 1

        assert send_from(srv, "127.0.0.7", "x@sender.test", message(subject="plain")) == 250
        stored = latest(srv, ALICE)
        assert stored["Subject"] == "plain"
        assert "spf=none" in stored["Authentication-Results"]
    finally:
        srv.stop()
        dns.stop()
