"""Dovecot's Maildir++ quota and postoffice's share one ``maildirsize``.

postoffice keeps mailbox usage in the Maildir++ ``maildirsize`` file so that
other programs on the same tree keep it too.  A real Dovecot with the
``maildir`` quota backend must read postoffice's file as it is (no
recount: the same inode and bytes afterwards) and report the same usage;
when Dovecot expunges mail it appends its own lines, which postoffice reads,
so the space it freed is accepted again at once.  Outside CI a missing
Dovecot skips; in CI it fails.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest

from postoffice.storage.quota import read_recorded
from tests.interop.dovecot import DOVEADM, DOVECOT, Dovecot
from tests.support.helpers import ALICE, ALICE_PW, make_server

pytestmark = pytest.mark.interop

QUOTA = 30_000
BODY = (b"q" * 78 + b"\r\n") * 100  # about 8 KB stored


def need(program: str) -> None:
    if not os.access(program, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (scripts/test.sh installs it)")
        pytest.skip(f"{program} is not installed")


def quota_get(dovecot: Dovecot) -> dict[str, int]:
    rows = dovecot.doveadm("-f", "tab", "quota", "get", "-u", ALICE).splitlines()[1:]
    return {row.split("\t")[1]: int(row.split("\t")[2]) for row in rows}


def test_dovecot_reads_and_keeps_our_maildirsize() -> None:
    need(DOVECOT)
    need(DOVEADM)
    root = Path(tempfile.mkdtemp(prefix="po-dovecot-quota-"))
    root.chmod(0o755)  # Dovecot's processes run as other users
    srv = make_server(root / "po", limits={"mailbox_quota": QUOTA})
    dovecot = Dovecot(root / "dovecot", srv.data_dir / "mail", {ALICE: ALICE_PW})
    conf = dovecot.conf.read_text()
    dovecot.conf.write_text(
        conf + "mail_plugins = $mail_plugins quota\n"
        "plugin {\n  quota = maildir:User quota\n"
        f"  quota_rule = *:storage={QUOTA}B\n}}\n"
    )
    try:
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
            for n in range(3):
                client.sendmail("s@remote.test", [ALICE], f"Subject: {n}\r\n\r\n".encode() + BODY)
            with pytest.raises(smtplib.SMTPRecipientsRefused):  # SIZE= does not fit: 452
                client.sendmail("s@remote.test", [ALICE], b"Subject: 3\r\n\r\n" + BODY)
        size_file = srv.maildir(ALICE) / "maildirsize"
        ours = size_file.read_bytes(), size_file.stat().st_ino
        used = sum(p.stat().st_size for p in srv.messages(ALICE))

        dovecot.own_mail()
        dovecot.start()
        reported = quota_get(dovecot)
        assert reported["MESSAGE"] == 3
        assert abs(reported["STORAGE"] * 1024 - used) < 1024, (reported, used)  # KiB
        assert (size_file.read_bytes(), size_file.stat().st_ino) == ours  # trusted, not redone

        dovecot.doveadm("expunge", "-u", ALICE, "mailbox", "INBOX", "1:2")
        recorded = read_recorded(srv.maildir(ALICE))
        assert recorded is not None  # Dovecot's lines read as ours
        left = sum(p.stat().st_size for p in srv.messages(ALICE))
        assert (recorded.usage.bytes, recorded.usage.messages) == (left, 1)
        assert quota_get(dovecot)["MESSAGE"] == 1

        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as client:
            client.sendmail("s@remote.test", [ALICE], b"Subject: 3\r\n\r\n" + BODY)
        assert len(srv.messages(ALICE)) == 2
        assert quota_get(dovecot)["MESSAGE"] == 2  # and Dovecot sees our delivery's line
        assert "Error" not in dovecot.log(), dovecot.log()
    finally:
        dovecot.stop()
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
