"""Debian's rspamd on loopback ports, offline, for the milter and learning tests.

The package's own config loads dozens of modules that fetch maps over
HTTPS and ask public DNS lists; this one is written from scratch so
nothing leaves the machine: only the ``milter_headers`` plugin is loaded
(from a folder holding that one file), DNS goes to a test dnsmasq, the
bayes classifier (only with ``redis``) talks to a redis-server the
fixture starts itself.  One Lua rule, ``POSTOFFICE_TEST_ADD_HEADER``,
scores 7 (the "add header" action) for a Subject containing
``postoffice-add-header``, so that verdict can be asked for on purpose.

Workers: the proxy in milter mode scanning by itself (``self_scan``) and
the controller (password ``CONTROLLER_PASSWORD``).  Started and stopped by
PID; start-up takes a few seconds (rspamd compiles its TLD list).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.peers import Dnsmasq
from tests.support.ports import free_port

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
PLUGIN = Path("/usr/share/rspamd/plugins/milter_headers.lua")
CONTROLLER_PASSWORD = "rspamd-test-pw"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
ADD_HEADER_SUBJECT = "postoffice-add-header"

RULES = (
    """
rspamd_config:register_symbol({
  name = 'POSTOFFICE_TEST_ADD_HEADER',
  score = 7.0,
  callback = function(task)
    local subject = task:get_header('Subject')
    return subject ~= nil and subject:find('"""
    + ADD_HEADER_SUBJECT
    + """', 1, true) ~= nil
  end,
})
"""
)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Rspamd:
    """rspamd (proxy in milter mode + controller) and, with ``redis``, bayes."""

    def __init__(self, root: Path, *, redis: bool = False) -> None:
        self.root = root / "rspamd"
        self.root.mkdir(parents=True, exist_ok=True)
        self.milter_port = free_port()
        self.controller_port = free_port()
        self.redis_port = free_port() if redis else 0
        self.dns = Dnsmasq(self.root)
        self.proc: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None
        self.log = self.root / "rspamd.log"

    @property
    def milter_address(self) -> str:
        return f"inet:127.0.0.1:{self.milter_port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def _config(self) -> str:
        r = self.root
        bayes = ""
        if self.redis_port:
            bayes = f"""
classifier "bayes" {{
  backend = "redis";
  servers = "127.0.0.1:{self.redis_port}";
  tokenizer {{ name = "osb"; }}
  new_schema = true;
  min_tokens = 1;
  min_learns = 1;
  statfile {{ symbol = "BAYES_HAM"; spam = false; }}
  statfile {{ symbol = "BAYES_SPAM"; spam = true; }}
}}
"""
        return f"""
options {{
  dbdir = "{r}";
  hs_cache_dir = "{r}";
  dns {{ nameserver = ["127.0.0.1:{self.dns.port}"]; timeout = 1s; retransmits = 1; }}
  local_addrs = [];
}}
logging {{ type = "file"; filename = "{self.log}"; level = "info"; }}
lua = "{r}/rules.lua";
modules {{ path = "{r}/plugins"; }}
actions {{ reject = 15; add_header = 6; greylist = null; rewrite_subject = null; }}
milter_headers {{
  use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status"];
  skip_local = false;
  skip_authenticated = false;
}}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{self.milter_port}";
  milter = yes;
  timeout = 60s;
  upstream "local" {{ default = yes; self_scan = yes; }}
  count = 1;
  reject_message = "Spam message rejected";
  spam_header = "X-Spam";
}}
worker "controller" {{
  bind_socket = "127.0.0.1:{self.controller_port}";
  password = "{CONTROLLER_PASSWORD}";
  enable_password = "{CONTROLLER_PASSWORD}";
  count = 1;
}}
{bayes}
"""

    def start(self) -> Rspamd:
        self.dns.start()
        (self.root / "rules.lua").write_text(RULES)
        plugins = self.root / "plugins"
        plugins.mkdir(exist_ok=True)
        if not (plugins / PLUGIN.name).exists():
            (plugins / PLUGIN.name).symlink_to(PLUGIN)
        conf = self.root / "rspamd.conf"
        conf.write_text(self._config())
        if self.redis_port:
            self.redis = subprocess.Popen(
                [
                    *(REDIS, "--port", str(self.redis_port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.root)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        args = [RSPAMD, "-f", "-c", str(conf)]
        if os.geteuid() == 0:
            args += ["-u", "root", "-g", "root", "-i"]
        with open(self.root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"rspamd exited: {self._tail()}")
            ready = _listening(self.milter_port) and _listening(self.controller_port)
            if ready and (not self.redis_port or _listening(self.redis_port)):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rspamd did not listen: {self._tail()}")

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-20:])

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        _stop(self.redis)
        self.redis = None
        self.dns.stop()
