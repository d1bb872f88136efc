#!/usr/bin/env python3
"""POP3 retrieval benchmark: postoffice beside Dovecot, same machine, same client.

    python bench/pop3_bench.py [--count 10000] [--size 10240] [--runs 3]
                               [--dovecot auto|no|up] [--bench-dir ../shared/bench]

What it does:

1. Starts a private postoffice (``python -m postoffice serve``) on free
   127.0.0.1 ports, data in a temporary directory, with the user
   ``load@example.test`` (made with the real CLI) and plaintext login allowed
   on loopback, so the "plain" variant measures POP3 and not TLS.
2. Fills its Maildir with COUNT messages of SIZE bytes using the shared
   ``maildir-fill.py`` (names carry ``S=`` only, as many delivery agents
   write them, so the first login computes and caches the CRLF sizes: the
   "cold" run).
3. Runs the neutral load client ``pop3-load.py`` (LIST, RETR every message,
   QUIT; it checks every RETR size against LIST) RUNS times per variant:
   plain, STLS and POP3S.  When Dovecot's reference stack answers on
   127.0.0.1:10110/10995 (``anchor-stack.sh up``, see the shared bench
   README), the same mailbox is filled there and each postoffice run is
   followed by a Dovecot run (A B A B ...), so machine drift hits both.
4. Prints medians [min-max] of messages/s and MB/s, postoffice's CPU seconds
   (from /proc, all threads) and the ratio to Dovecot.

``--dovecot up`` first runs ``anchor-stack.sh up`` (which installs Postfix
and Dovecot with apt if missing).  Without Dovecot the recorded baseline
from the shared README is printed for reference, marked as such.

Everything stays on loopback; every process started here is stopped by
PID.  Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USER, PASSWORD = "load@example.test", "secret-pass-load"
DOVECOT_PORTS = {"pop3": 10110, "pop3s": 10995}
DOVECOT_MAILDIR = Path("/tmp/anchor/mail/example.test/load")
# Shared README, "POP3 (Dovecot 2.3.19.1)", 10000 x 10 KiB, medians of 3 on
# this VM (baseline of 2026-11-27): for reference when Dovecot is not running.
RECORDED_DOVECOT = {"plain": (6327, 65.7), "stls": (2881, 29.9), "pop3s": (2864, 29.7)}
VARIANTS = ("plain", "stls", "pop3s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(port: int, tls: bool = False) -> bool:
    """A POP3 greeting on ``port`` (after a TLS handshake for POP3S)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            s = ctx.wrap_socket(raw, server_hostname="localhost") if tls else raw
            return s.recv(100).startswith(b"+OK")
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Postoffice:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {name: free_port() for name in ("smtp", "submission", "submissions",
                                                      "pop3", "pop3s")}  # fmt: skip
        listen = "\n".join(f'{k} = ["127.0.0.1:{v}"]' for k, v in self.ports.items())
        self.config = root / "postoffice.toml"
        self.config.write_text(
            f'hostname = "mail.example.test"\ndata_dir = "{root / "data"}"\n'
            f'domains = ["example.test"]\n\n[listen]\n{listen}\n\n'
            "[auth]\nallow_plaintext_loopback = true\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.maildir = root / "data" / "mail" / "example.test" / "load"

    def cli(self, *args: str, stdin: str | None = None) -> None:
        args = (sys.executable, "-m", "postoffice", "-c", str(self.config), *args)
        subprocess.run(args, input=stdin, text=True, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while not all(answers(self.ports[p]) for p in ("pop3",)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"postoffice did not start; see {self.root / 'server.log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def load(bench: Path, port: int, variant: str, count: int) -> dict[str, str]:
    """One pop3-load.py session; its key=value line as a dict.  The mailbox
    must hold exactly ``count`` messages: the shared Dovecot ``load`` user is
    also the target of SMTP benchmarks, and a rate over another mailbox
    means nothing."""
    args = [sys.executable, str(bench / "pop3-load.py"), "--port", str(port),
            "--user", USER, "--password", PASSWORD, "--max-seconds", "100"]  # fmt: skip
    args += {"plain": [], "stls": ["--stls"], "pop3s": ["--tls"]}[variant]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise SystemExit(f"pop3-load failed ({variant}): {result.stdout}{result.stderr}")
    values = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    if int(values["messages"]) != count:
        raise SystemExit(
            f"port {port} served {values['messages']} messages, not {count}: someone else"
            " is using that mailbox; run again when it is quiet"
        )
    return values


def fill(bench: Path, maildir: Path, count: int, size: int, owner: str) -> None:
    subprocess.run(
        [sys.executable, str(bench / "maildir-fill.py"), "--maildir", str(maildir),
         "--count", str(count), "--size", str(size), f"--owner={owner}", "--clean"],
        check=True, timeout=600,
    )  # fmt: skip
    for name in os.listdir(maildir):  # our size cache too: the next login is cold
        if name.startswith("postoffice-pop3.sizes"):
            os.unlink(maildir / name)
    subprocess.run(["sync"], check=False, timeout=120)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.0f} [{min(values):.0f}-{max(values):.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=10_240)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dovecot", choices=["auto", "no", "up"], default="auto")
    ap.add_argument(
        "--bench-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "bench"
    )
    a = ap.parse_args()
    if not (a.bench_dir / "pop3-load.py").is_file():
        raise SystemExit(f"need pop3-load.py and maildir-fill.py in {a.bench_dir}")
    if not 1 <= a.runs <= 20 or not 1 <= a.count <= 200_000:
        raise SystemExit("--runs 1..20, --count 1..200000")

    if a.dovecot == "up":
        subprocess.run([str(a.bench_dir / "anchor-stack.sh"), "up"], check=True, timeout=1800)
    dovecot = (
        a.dovecot != "no"
        and answers(DOVECOT_PORTS["pop3"])
        and answers(DOVECOT_PORTS["pop3s"], tls=True)
    )

    root = Path(tempfile.mkdtemp(prefix="pop3-bench-"))
    server = Postoffice(root)
    try:
        server.cli("init")
        server.cli("user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        server.start()
        assert server.proc is not None
        fill(a.bench_dir, server.maildir, a.count, a.size, owner="no-such-user.postoffice-bench")
        if dovecot:
            fill(a.bench_dir, DOVECOT_MAILDIR, a.count, a.size, owner="vmail")

        print(f"mailbox: {a.count} messages x {a.size} B; runs per variant: {a.runs}")
        cold = load(a.bench_dir, server.ports["pop3"], "plain", a.count)
        print(f"postoffice cold first login + RETR-all: {float(cold['msgs_per_s']):.0f} msg/s")
        if dovecot:
            cold_d = load(a.bench_dir, DOVECOT_PORTS["pop3"], "plain", a.count)
            print(
                f"dovecot    cold first login + RETR-all: {float(cold_d['msgs_per_s']):.0f} msg/s"
            )

        rows = []
        for variant in VARIANTS:
            port = server.ports["pop3s" if variant == "pop3s" else "pop3"]
            dport = DOVECOT_PORTS["pop3s" if variant == "pop3s" else "pop3"]
            ours: list[dict[str, str]] = []
            theirs: list[dict[str, str]] = []
            cpu: list[float] = []
            for _ in range(a.runs):
                before = cpu_seconds(server.proc.pid)
                ours.append(load(a.bench_dir, port, variant, a.count))
                cpu.append(cpu_seconds(server.proc.pid) - before)
                if dovecot:
                    theirs.append(load(a.bench_dir, dport, variant, a.count))
            rows.append((variant, ours, theirs, cpu))

        print(f"\n{'variant':8} {'server':11} {'msg/s median [min-max]':>26} {'MB/s':>20}"
              f" {'CPU s/run':>10}")  # fmt: skip
        for variant, ours, theirs, cpu in rows:
            m = [float(r["msgs_per_s"]) for r in ours]
            b = [float(r["MB_per_s"]) for r in ours]
            print(f"{variant:8} {'postoffice':11} {summary(m):>26} {summary(b):>20}"
                  f" {statistics.median(cpu):10.2f}")  # fmt: skip
            if theirs:
                dm = [float(r["msgs_per_s"]) for r in theirs]
                db = [float(r["MB_per_s"]) for r in theirs]
                ratios = [x / y for x, y in zip(m, dm, strict=True)]
                print(f"{variant:8} {'dovecot':11} {summary(dm):>26} {summary(db):>20}"
                      f"   postoffice/dovecot {statistics.median(ratios):.2f}"
                      f" [{min(ratios):.2f}-{max(ratios):.2f}] (pairwise)")  # fmt: skip
            else:
                rm, rb = RECORDED_DOVECOT[variant]
                print(f"{variant:8} {'dovecot*':11} {rm:>26} {rb:>20}"
                      f"   postoffice/dovecot* {statistics.median(m) / rm:.2f}")  # fmt: skip
        if not dovecot:
            print("\n* Dovecot not running here: its recorded baseline (shared bench README,"
                  " 10000 x 10 KiB, idle machine); run with --dovecot up for a"
                  " side-by-side measurement.")  # fmt: skip
        print(f"\nmachine load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
