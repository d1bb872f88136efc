"""A real Postfix instance on 127.0.0.1 for interop tests, in a directory of its own.

One instance plays both neighbours of postoffice: it relays mail for
``relay_domain`` to postoffice's SMTP port (a transport map, as a backup MX
or an outbound relay would), and it is the final destination for
``local_domain`` (virtual mailboxes in Maildir form under ``root/mail``), the
MX that postoffice delivers to.  Everything — config, queue, data, mail,
log — lives under a directory made for it (not under pytest's 0700 temp
tree: Postfix's daemons run as the ``postfix`` user and must reach it).  It
is started with ``postfix -c DIR start`` and stopped with ``postfix -c DIR
stop``, then by its master's PID if it lingers.  The layout follows
../shared/bench/anchor-stack.sh: no chroot, loopback listeners only.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.helpers import wait_for
from tests.support.ports import free_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    def __init__(
        self,
        *,
        relay_domain: str,
        relay_to: tuple[str, int],
        local_domain: str,
        users: list[str],
        cert: Path,
        key: Path,
        port: int | None = None,
        transport: dict[str, str] | None = None,
        extra: str = "",
    ) -> None:
        """``extra``: main.cf lines added at the end (e.g. to hide an extension)."""
        self.root = Path(tempfile.mkdtemp(prefix="po-postfix-"))
        self.root.chmod(0o755)
        self.port = port or free_port()
        self.etc, self.spool, self.data = self.root / "etc", self.root / "spool", self.root / "data"
        self.mail, self.log_dir = self.root / "mail", self.root / "log"
        self.local_domain = local_domain
        for d in (self.etc, self.spool, self.data, self.mail, self.log_dir):
            d.mkdir(mode=0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data, postfix_user.pw_uid, postfix_user.pw_gid)
        self.data.chmod(0o700)
        nobody = pwd.getpwnam("nobody")
        nogroup = grp.getgrgid(nobody.pw_gid)
        os.chown(self.mail, nobody.pw_uid, nogroup.gr_gid)
        shutil.copyfile(cert, self.etc / "cert.pem")
        shutil.copyfile(key, self.etc / "key.pem")
        (self.etc / "key.pem").chmod(0o600)
        # ``transport``: more entries, e.g. {"frank@remote.test": "error:5.2.1 gone"}
        # for an address Postfix accepts and then bounces itself.
        (self.etc / "transport").write_text(
            f"{relay_domain} smtp:[{relay_to[0]}]:{relay_to[1]}\n"
            + "".join(f"{key} {value}\n" for key, value in (transport or {}).items())
        )
        (self.etc / "vmailbox").write_text(
            "".join(f"{u}@{local_domain} {local_domain}/{u}/\n" for u in users)
        )
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.etc / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {self.data}
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.log_dir}/postfix.log
maillog_file_prefixes = {self.log_dir}
myhostname = mx.{local_domain}
mydomain = {local_domain}
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relay_domains = {relay_domain}
transport_maps = texthash:{self.etc}/transport
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_forbid_bare_newline = normalize
virtual_mailbox_domains = {local_domain}
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_minimum_uid = 100
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nogroup.gr_gid}
smtpd_tls_cert_file = {self.etc}/cert.pem
smtpd_tls_key_file = {self.etc}/key.pem
smtpd_tls_security_level = may
smtpd_tls_received_header = yes
smtp_tls_security_level = may
smtp_tls_loglevel = 1
smtpd_tls_session_cache_database =
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 5s
biff = no
"""
            + extra
        )

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> Postfix:
        for step in ("check", "start"):
            result = self._postfix(step)
            if result.returncode != 0:
                self.stop()
                raise RuntimeError(f"postfix {step}: {result.stderr}{self.log()}")
        if not wait_for(self._accepts, 20):
            self.stop()
            raise RuntimeError(f"postfix never accepted on port {self.port}:\n{self.log()}")
        return self

    def _accepts(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(64).startswith(b"220")
        except OSError:
            return False

    def master_pid(self) -> int | None:
        try:
            return int((self.spool / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        self._postfix("stop")
        if pid is not None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, 9)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.log_dir / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def mailbox(self, user: str) -> list[bytes]:
        found = []
        for sub in ("new", "cur"):
            folder = self.mail / self.local_domain / user / sub
            if folder.is_dir():
                found += [p.read_bytes() for p in sorted(folder.iterdir())]
        return found

    def queue_empty(self) -> bool:
        return not any(
            (self.spool / q).is_dir() and any((self.spool / q).rglob("*"))
            for q in ("incoming", "active", "deferred", "hold", "maildrop")
        )
