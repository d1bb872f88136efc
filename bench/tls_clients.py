#!/usr/bin/env python3
"""Real TLS clients and idle TLS connections against postoffice: hangs and held descriptors.

The before/after figures of issue #11, items 1 and 5::

    python bench/tls_clients.py [--loop asyncio|uvloop|both] [--msmtp 40] [--curl 100]
                                [--openssl 20] [--gnutls 20] [--raw 200] [--timeout 8]

Measures, on a private postoffice (free 127.0.0.1 ports, temporary data
directory, default limits: ``max_connections_per_ip`` 20), for each event
loop the server can run on (uvloop where installed, asyncio's own where not):

- msmtp on 587 (STARTTLS) and 465: N messages sent one after the other;
- ``curl --ssl-reqd pop3://.../1`` (STLS): N fetches;
- ``openssl s_client -starttls smtp -tls1_3`` and ``gnutls-cli
  --starttls-proto smtp`` with "EHLO, QUIT" typed at once: N sessions;
  a run counts as hung when it has not finished (or, for the last two, not
  answered the EHLO) within ``--timeout`` seconds;
- ``--raw`` plain TCP connections to 995 and to 465 from one address that
  never start a handshake: how many descriptors the server holds for them
  one second later, and how many it closed at once.

The server runs whatever ``postoffice`` the interpreter imports: to measure
another checkout, put its ``src`` first on PYTHONPATH, e.g. the code before
the fix::

    git archive 3be62f4 src | tar -x -C /tmp/tls-before
    PYTHONPATH=/tmp/tls-before/src python bench/tls_clients.py

Loopback only; every loop is bounded in count and each run in time; the
server started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchlib import free_port, port_open
from idle_conns import raise_fd_limit

USER, PASSWORD = "alice@example.test", "tls-clients-pass-1"
# metrics on a port of its own: beside another postoffice, not both on 2900.
LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s", "metrics")
MAX_RUNS = 1000  # per client: the loops stay bounded whatever is asked
MAX_RAW = 2000


@dataclass
class Count:
    ok: int = 0
    hung: int = 0
    failed: int = 0

    def __str__(self) -> str:
        return f"{self.hung} of {self.ok + self.hung + self.failed} hung ({self.failed} failed)"


class Server:
    def __init__(self, loop: str, root: Path) -> None:
        self.root = root
        self.ports = {name: free_port() for name in LISTENERS}
        self.config = root / "postoffice.toml"
        listen = "\n".join(f'{k} = ["127.0.0.1:{v}"]' for k, v in self.ports.items())
        self.config.write_text(
            f'hostname = "mail.example.test"\ndata_dir = "{root / "data"}"\n'
            f'domains = ["example.test"]\n\n[listen]\n{listen}\n'
        )
        self.env = dict(os.environ)
        if loop == "asyncio":  # a uvloop that cannot be imported: the server falls back
            shim = root / "no-uvloop"
            shim.mkdir()
            (shim / "uvloop.py").write_text('raise ImportError("left out")\n')
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str | None = None) -> str:
        cmd = [sys.executable, "-m", "postoffice", "-c", str(self.config), *args]
        return subprocess.run(
            cmd, input=stdin, env=self.env, text=True, check=True, capture_output=True, timeout=120
        ).stdout

    def start(self) -> None:
        # Commands other than serve/init need the data dir (#19); a tree from
        # before `init` existed makes it itself, so a refusal here is fine.
        init = [sys.executable, "-m", "postoffice", "-c", str(self.config), "init"]
        subprocess.run(init, env=self.env, check=False, capture_output=True, timeout=120)
        self.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postoffice", "serve", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, "POSTOFFICE_LOG_LEVEL": "WARNING"},
            )
        deadline = time.monotonic() + 60
        while not all(port_open(p) for p in self.ports.values()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"postoffice did not start; see {self.root / 'server.log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    @property
    def cert(self) -> str:
        return str(self.root / "data" / "tls" / "cert.pem")

    def runs_uvloop(self) -> bool:
        assert self.proc is not None
        return "/uvloop/loop." in Path(f"/proc/{self.proc.pid}/maps").read_text()

    def socket_fds(self) -> int:
        assert self.proc is not None
        n = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith("socket:")
        return n


def repeat(n: int, run: Callable[[], bool | None]) -> Count:
    """``run`` returns True (ok), False (failed) or None (hung)."""
    count = Count()
    for _ in range(min(n, MAX_RUNS)):
        result = run()
        if result is None:
            count.hung += 1
        elif result:
            count.ok += 1
        else:
            count.failed += 1
    return count


def timed(args: list[str], timeout: float, stdin: bytes | None = None) -> int | None:
    """The exit code, or None when the run did not end within ``timeout``."""
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return done.returncode


def answered(args: list[str], commands: bytes, until: bytes, timeout: float) -> bool | None:
    """Type ``commands`` at once into an interactive TLS client, stdin kept open;
    True when ``until`` appears in its output within ``timeout``."""
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    try:
        proc.stdin.write(commands)
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while until not in out:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return False
                out += chunk
        return True
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


def raw_tcp(srv: Server, port: str, n: int) -> tuple[int, int]:
    """``n`` TCP connections that never start a handshake: (descriptors the
    server holds for them after a second, how many it closed by then)."""
    before = srv.socket_fds()
    socks = [socket.create_connection(("127.0.0.1", srv.ports[port])) for _ in range(n)]
    try:
        time.sleep(1.0)
        held = srv.socket_fds() - before
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        return held, closed
    finally:
        for s in socks:
            s.close()


def measure(loop: str, args: argparse.Namespace) -> list[str]:
    root = Path(tempfile.mkdtemp(prefix="po-tls-clients-"))
    srv = Server(loop, root)
    rows: list[str] = []
    try:
        srv.start()
        real = "uvloop" if srv.runs_uvloop() else "asyncio"
        home = root / "home"
        home.mkdir()
        rc = home / "msmtprc"
        rc.write_text(
            f"defaults\nhost 127.0.0.1\nauth on\nuser {USER}\npassword {PASSWORD}\n"
            f"from {USER}\ntls on\ntls_trust_file {srv.cert}\ntls_host_override localhost\n"
            f"timeout {int(args.timeout)}\n\n"
            f"account starttls\nport {srv.ports['submission']}\ntls_starttls on\n\n"
            f"account implicit\nport {srv.ports['submissions']}\ntls_starttls off\n"
        )
        rc.chmod(0o600)
        message = f"From: {USER}\nTo: {USER}\nSubject: tls\n\nHello.\n".encode()
        for account, label in (("starttls", "msmtp STARTTLS 587"), ("implicit", "msmtp 465")):
            msmtp = ["msmtp", "-C", str(rc), "-a", account, "-t"]
            count = repeat(args.msmtp, lambda cmd=msmtp: ok(timed(cmd, args.timeout, message)))
            rows.append(f"{real:8} {label:40} {count}")
        with smtplib.SMTP("127.0.0.1", srv.ports["smtp"], timeout=30) as smtp:
            smtp.sendmail("friend@remote.test", [USER], b"Subject: fetch me\r\n\r\nHi.\r\n")
        curl = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(args.timeout), "--ssl-reqd",
                "--cacert", srv.cert, "-u", f"{USER}:{PASSWORD}",
                f"pop3://127.0.0.1:{srv.ports['pop3']}/1"]  # fmt: skip
        count = repeat(args.curl, lambda: ok(timed(curl, args.timeout + 2), timeout_code=28))
        rows.append(f"{real:8} {'curl --ssl-reqd pop3:// (STLS)':40} {count}")
        openssl = ["openssl", "s_client", "-starttls", "smtp", "-tls1_3", "-crlf", "-quiet",
                   "-connect", f"127.0.0.1:{srv.ports['submission']}"]  # fmt: skip
        ehlo = b"EHLO bench.test\nQUIT\n"
        count = repeat(
            args.openssl, lambda: answered(openssl, ehlo, b"greets bench.test", args.timeout)
        )
        rows.append(f"{real:8} {'openssl s_client -starttls smtp -tls1_3':40} {count}")
        gnutls = ["gnutls-cli", "--x509cafile", srv.cert, "--starttls-proto", "smtp", "--crlf",
                  "--port", str(srv.ports["submission"]), "localhost"]  # fmt: skip
        count = repeat(
            args.gnutls, lambda: answered(gnutls, ehlo, b"greets bench.test", args.timeout)
        )
        rows.append(f"{real:8} {'gnutls-cli --starttls-proto smtp':40} {count}")
        n = min(args.raw, MAX_RAW)
        raise_fd_limit(n + 256)
        for port, label in (("pop3s", "pop3s 995"), ("submissions", "submissions 465")):
            held, closed = raw_tcp(srv, port, n)
            text = f"{n} raw TCP to {label}, one address"
            rows.append(f"{real:8} {text:40} {held} descriptors held, {closed} closed at once")
            time.sleep(1.0)  # let the server notice they are gone
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def ok(code: int | None, timeout_code: int | None = None) -> bool | None:
    if code is None or code == timeout_code:
        return None
    return code == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--msmtp", type=int, default=40)
    parser.add_argument("--curl", type=int, default=100)
    parser.add_argument("--openssl", type=int, default=20)
    parser.add_argument("--gnutls", type=int, default=20)
    parser.add_argument("--raw", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=8.0, help="seconds per client run")
    args = parser.parse_args()
    for tool in ("msmtp", "curl", "openssl", "gnutls-cli"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/test.sh installs it)")
    import postoffice

    print(f"postoffice from {Path(postoffice.__file__).parent}")
    loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
    for loop in loops:
        for row in measure(loop, args):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
