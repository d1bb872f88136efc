"""A real Dovecot reading postoffice's Maildirs, for interop tests.

Dovecot serves POP3 (and, asked, IMAP) on a free loopback port straight from postoffice's mail
tree (``mail_location = maildir:<mail>/%d/%n``); ``doveadm`` asks it about
the same messages.  Dovecot refuses mail access as root, so the mail tree
is handed to ``nobody`` (``own_mail``) before Dovecot looks, as a site
running both under one mail user would have it.  Config, sockets and logs
live in a directory of its own; the instance is stopped by its master's PID.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.helpers import wait_for
from tests.support.ports import free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
MAIL_USER = "nobody"


class Dovecot:
    def __init__(
        self, root: Path, mail: Path, users: dict[str, str], *, imap: bool = False
    ) -> None:
        self.root, self.mail = root, mail
        self.port = free_port()
        # IMAP on a loopback port too (plaintext LOGIN), for tests that use
        # Dovecot as a reference IMAP server; else its listener is off.
        self.imap_port = free_port() if imap else 0
        self.conf = root / "dovecot.conf"
        self.run_dir = root / "run"
        for d in (root, self.run_dir, root / "state"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        (root / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in users.items()))
        self.conf.write_text(
            f"""\
protocols = pop3{" imap" if imap else ""}
listen = 127.0.0.1
base_dir = {self.run_dir}
state_dir = {root}/state
instance_name = po-test-{self.port}
log_path = {root}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{mail}/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid={MAIL_USER} gid={pwd.getpwnam(MAIL_USER).pw_gid} home={mail}/%d/%n
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
        )

    def own_mail(self) -> None:
        """Give the mail tree to the mail user, as postoffice and Dovecot share it."""
        user = pwd.getpwnam(MAIL_USER)
        for dirpath, dirnames, filenames in os.walk(self.mail):
            os.chown(dirpath, user.pw_uid, user.pw_gid)
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)

    def start(self) -> Dovecot:
        # Its output goes to a file, not a pipe: the daemon keeps stderr open.
        with open(self.root / "start.log", "wb") as out:
            code = subprocess.call(
                [DOVECOT, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=30,
            )
        if code != 0:
            raise RuntimeError(f"dovecot: {(self.root / 'start.log').read_text()}")

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    return sock.recv(64).startswith(b"+OK")
            except OSError:
                return False

        if not wait_for(up, 20):
            self.stop()
            raise RuntimeError(f"dovecot never answered:\n{self.log()}")
        return self

    def master_pid(self) -> int | None:
        try:
            return int((self.run_dir / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        os.kill(pid, 15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, 9)

    def doveadm(self, *args: str) -> str:
        result = subprocess.run(
            [DOVEADM, "-c", str(self.conf), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {result.stderr}")
        return result.stdout

    def doveadm_input(self, data: bytes, *args: str) -> str:
        """``doveadm`` with ``data`` on its stdin (``save``, ``exec imap``)."""
        result = subprocess.run(
            [DOVEADM, "-c", str(self.conf), *args], input=data, capture_output=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {result.stderr!r}")
        return result.stdout.decode("utf-8", "replace")

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""


def need(program: str) -> None:
    if not os.access(program, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (scripts/test.sh installs it)")
        pytest.skip(f"{program} is not installed")
