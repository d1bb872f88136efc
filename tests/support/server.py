"""Run the real ``postoffice`` server as a subprocess for integration tests.

``PostofficeServer`` writes a config with free loopback ports, starts
``python -m postoffice serve -c CONFIG``, waits until every listener accepts,
and stops the process it started (by PID).  Accounts are made with the real
CLI, as an administrator would.

One smtp process unless a test asks for more (``[limits] smtp_processes``;
the server's default is one per CPU): which process takes a connection is a
race, and a test that reads the server's PID in a log line, its memory or
its children means the one process.  A value of None leaves the key out of
the config: the server's own default.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps", "metrics")

_CERT_CACHE: list[Path] = []


def cached_tls_dir() -> Path:
    """One self-signed pair for the whole test run (RSA key generation is slow)."""
    if not _CERT_CACHE:
        import tempfile

        from postoffice.net.tls import ensure_self_signed

        tls_dir = Path(tempfile.mkdtemp(prefix="postoffice-test-tls-"))
        atexit.register(shutil.rmtree, tls_dir, True)
        ensure_self_signed(tls_dir, "mail.example.test")
        _CERT_CACHE.append(tls_dir)
    return _CERT_CACHE[0]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table ([filters] milters entries)
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(
    path: Path, top: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]]
) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    if os.geteuid() == 0 and "run" not in sections:
        # Tests run as root in CI's containers: the server stays root, named
        # outright (allow_root would still drop to a postoffice user where one
        # exists, which cannot enter pytest's 0700 directories).
        sections = {**sections, "run": {"user": "root"}}
    for name, table in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")


class PostofficeServer:
    """A postoffice server process on 127.0.0.1 with its own data dir and ports."""

    def __init__(
        self,
        root: Path,
        *,
        domains: Iterable[str] = ("example.test",),
        hostname: str = "mail.example.test",
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = root
        self.host = host
        self.data_dir = root / "data"
        self.config = root / "postoffice.toml"
        self.ports = {name: free_port((host,)) for name in LISTENERS}
        self.log_path = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        bracketed = f"[{host}]" if ":" in host else host
        tls_dir = self.data_dir / "tls"
        tls_dir.mkdir(parents=True, exist_ok=True)
        for name in ("cert.pem", "key.pem"):
            shutil.copyfile(cached_tls_dir() / name, tls_dir / name)
        merged: dict[str, dict[str, Any]] = {
            "listen": {name: [f"{bracketed}:{port}"] for name, port in self.ports.items()},
            "limits": {"smtp_processes": 1},
        }
        for name, table in (sections or {}).items():
            merged.setdefault(name, {}).update(table)
        write_config(
            self.config,
            {"hostname": hostname, "data_dir": str(self.data_dir), "domains": list(domains)},
            merged,
        )

    # --- CLI ------------------------------------------------------------------
    def cli(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "postoffice", "-c", str(self.config), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"postoffice {' '.join(args)} failed: {result.stderr}")
        return result

    def add_user(self, address: str, password: str) -> None:
        self.cli("user", "add", address, "--password-stdin", input=password + "\n")

    def maildir(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.data_dir / "mail" / domain / local

    def messages(self, address: str) -> list[Path]:
        md = self.maildir(address)
        return sorted(
            p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()
        )

    # --- process --------------------------------------------------------------
    def start(
        self,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: a command to run the server under, which ends by exec'ing
        its arguments (the server keeps the PID started here), e.g. setpriv or
        ``unshare --mount ...``."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "postoffice", "serve", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + timeout
        waiting = set(self.ports)
        while waiting and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            for name in list(waiting):
                try:
                    socket.create_connection((self.host, self.ports[name]), timeout=1).close()
                    waiting.discard(name)
                except OSError:
                    pass
            time.sleep(0.05)
        if waiting:
            self.stop()
            raise RuntimeError(f"listeners {waiting} never came up:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
