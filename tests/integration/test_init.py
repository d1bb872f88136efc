"""``postoffice init HOSTNAME DOMAIN`` (#15): a config, the first user, DKIM
keys and the DNS records to publish; the server then starts on that config
and the user logs in."""

from __future__ import annotations

import imaplib
import re
import subprocess
import sys
from pathlib import Path

from postoffice.config.settings import load_settings
from postoffice.doctor import dmarc_line, mx_line, spf_line
from postoffice.quickstart import PRODUCTION_PORTS
from tests.support.ports import free_port
from tests.support.server import PostofficeServer


def po(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postoffice", "-c", str(config), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_init_writes_a_config_a_user_and_keys_and_prints_the_records(tmp_path: Path) -> None:
    config, data = tmp_path / "etc" / "postoffice.toml", tmp_path / "mail-data"
    # The run user is root here: this test is about init, not about dropping root.
    result = po(
        config,
        "init",
        "mail.example.test",
        "example.test",
        "--user",
        "alice@example.test",
        "--data-dir",
        str(data),
        "--run-user",
        "root",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    settings = load_settings(config)
    assert settings.hostname == "mail.example.test"
    assert settings.domains == ("example.test",)
    assert settings.data_dir == data
    assert {name: getattr(settings.listen, name)[0].port for name in PRODUCTION_PORTS} == (
        PRODUCTION_PORTS
    )
    # The records, in the doctor's own words, and the DKIM ones `dkim show` prints.
    for line in (
        mx_line("example.test", "mail.example.test"),
        spf_line("example.test"),
        dmarc_line("example.test"),
        # RFC 6186 / 8314 client SRV records and the autoconfiguration names.
        "_submissions._tcp.example.test. IN SRV 0 1 465 mail.example.test.",
        "_imaps._tcp.example.test. IN SRV 0 1 993 mail.example.test.",
        "_pop3._tcp.example.test. IN SRV 30 1 110 mail.example.test.",
        "autoconfig.example.test. IN CNAME mail.example.test.",
        "_autodiscover._tcp.example.test. IN SRV 0 1 443 mail.example.test.",
    ):
        assert line in out
    dkim = po(config, "dkim", "show", "example.test")
    assert dkim.returncode == 0, dkim.stderr
    assert dkim.stdout.strip() and dkim.stdout.strip() in out
    password = re.search(r"added user alice@example\.test with password: (\S+)", out)
    assert password is not None, out
    # Again: refused, the config stays as written.
    again = po(config, "init", "mail.example.test", "example.test", "--data-dir", str(data))
    assert again.returncode == 1 and "exists already" in again.stderr

    # The server on that config (moved to free test ports), and the user logs in.
    srv = PostofficeServer(tmp_path / "ports")
    text = config.read_text()
    srv.ports |= {name: free_port(("127.0.0.1",)) for name in ("http", "https")}
    for name, port in PRODUCTION_PORTS.items():
        text = text.replace(f'"0.0.0.0:{port}"', f'"127.0.0.1:{srv.ports[name]}"')
    # metrics keeps its default (127.0.0.1:2900): moved too, off a shared port.
    assert "metrics" not in text
    text = text.replace("[listen]\n", f'[listen]\nmetrics = ["127.0.0.1:{srv.ports["metrics"]}"]\n')
    config.write_text(text)
    srv.config = config
    srv.start()
    try:
        imap = imaplib.IMAP4("127.0.0.1", srv.ports["imap"], timeout=10)
        imap.starttls()
        assert imap.login("alice@example.test", password.group(1))[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()
    finally:
        assert srv.stop() == 0


def test_init_reads_the_password_from_stdin_and_refuses_a_foreign_user(tmp_path: Path) -> None:
    config = tmp_path / "postoffice.toml"
    common = ["--data-dir", str(tmp_path / "data"), "--run-user", "root", "--password-stdin"]
    wrong = po(config, "init", "mx.example.test", "example.test", "--user", "a@other.test", *common)
    assert wrong.returncode == 1 and "must be in example.test" in wrong.stderr
    assert not config.exists()
    ok = po(config, "init", "mx.example.test", "example.test", *common, input="s3cret-enough-x\n")
    assert ok.returncode == 0, ok.stderr
    assert "added user postmaster@example.test\n" in ok.stdout  # no password shown
    users = po(config, "user", "list")
    assert "postmaster@example.test" in users.stdout
