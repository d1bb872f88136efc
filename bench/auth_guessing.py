#!/usr/bin/env python3
"""Password guessing at one account from many addresses: what is judged, and what the owner sees.

    python bench/auth_guessing.py [--sources 240] [--parallel 240] [--json FILE]
    PYTHONPATH=/tmp/auth-before/src python bench/auth_guessing.py   # another source tree

Starts its own postoffice (``python -m postoffice serve``, whichever
``postoffice`` this interpreter imports) on free 127.0.0.1 ports with a
temporary data directory, default throttle settings and
``[auth] allow_plaintext_loopback`` (AUTH PLAIN on 587 without TLS, so the
figures are the throttle's, not TLS's), and the users alice and bob.  Then:

1. alice logs in from 127.0.0.2 (so that pair is known-good);
2. the attack: ``--sources`` clients, each from its own address
   (127.0.1.1, 127.0.1.2, ...), each make one connection and one guess at
   alice, ``--parallel`` at a time.  Counted: guesses judged (535), refused
   unjudged (454), errors, and the time until every guess was answered;
3. two seconds into the attack, alice logs in from 127.0.0.2 (known-good)
   and from 127.0.0.3 (never seen): reply and time of each;
4. afterwards, bob sends 5 wrong passwords from 127.0.0.4, then his right
   one: reply and time of the right one.

Bounded: at most 1,000 sources, 60 s per reply, 300 s in all; loopback
only; the server started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ALICE, ALICE_PW = "alice@example.test", "alice-password-1"
BOB, BOB_PW = "bob@example.test", "bob-password-2"
REPLY_TIMEOUT = 60.0
TOTAL_DEADLINE = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="po-authbench-"))
        self.port = free_port()
        self.config = self.root / "postoffice.toml"
        self.config.write_text(
            'hostname = "mail.example.test"\n'
            f'data_dir = "{self.root / "data"}"\n'
            'domains = ["example.test"]\n\n'
            f'[listen]\nsmtp = []\nsubmission = ["127.0.0.1:{self.port}"]\n'
            "submissions = []\npop3 = []\npop3s = []\n\n"
            "[auth]\nallow_plaintext_loopback = true\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str) -> None:
        cmd = (sys.executable, "-m", "postoffice", "-c", str(self.config), *args)
        subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        # Commands other than serve/init need the data dir (#19); a tree from
        # before `init` existed makes it itself, so a refusal here is fine.
        init = (sys.executable, "-m", "postoffice", "-c", str(self.config), "init")
        subprocess.run(init, check=False, capture_output=True, timeout=120)
        for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
            self.cli("user", "add", user, "--password-stdin", stdin=password + "\n")
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_path = self.root / "server.log"
                    raise SystemExit(f"postoffice did not start: {log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class Client:
    """One SMTP connection from ``source``, past EHLO."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=REPLY_TIMEOUT, source_address=(source, 0)
        )
        self.buf = b""
        self.reply()
        self.cmd("EHLO bench.test")

    def reply(self) -> int:
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3])

    def cmd(self, line: str) -> int:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def auth(self, user: str, password: str) -> tuple[int, float]:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        started = time.monotonic()
        code = self.cmd(f"AUTH PLAIN {token}")
        return code, time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


def login(port: int, source: str, user: str, password: str) -> tuple[int, float]:
    client = Client(port, source)
    try:
        return client.auth(user, password)
    finally:
        client.close()


def guess(port: int, n: int) -> tuple[str, float]:
    source = f"127.0.{1 + n // 250}.{1 + n % 250}"
    try:
        code, _took = login(port, source, ALICE, f"guess-{n}")
    except (OSError, ConnectionError):
        return "error", time.monotonic()
    return {535: "judged", 454: "refused"}.get(code, f"code {code}"), time.monotonic()


def run(sources: int, parallel: int) -> dict[str, object]:
    server = Server()
    server.start()
    try:
        port = server.port
        first = login(port, "127.0.0.2", ALICE, ALICE_PW)
        owner: dict[str, tuple[int, float]] = {}

        def owner_during_attack() -> None:
            time.sleep(2.0)
            owner["known-good"] = login(port, "127.0.0.2", ALICE, ALICE_PW)
            owner["new address"] = login(port, "127.0.0.3", ALICE, ALICE_PW)

        watcher = threading.Thread(target=owner_during_attack)
        started = time.monotonic()
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            futures = [pool.submit(guess, port, n) for n in range(sources)]
            results = [f.result(timeout=TOTAL_DEADLINE) for f in futures]
        watcher.join(TOTAL_DEADLINE)
        outcomes = Counter(kind for kind, _ in results)
        judged_at = sorted(at - started for kind, at in results if kind == "judged")
        elapsed = max(at for _, at in results) - started
        client = Client(port, "127.0.0.4")
        try:
            for i in range(5):
                client.auth(BOB, f"typo-{i}")
        finally:
            client.close()
        after_typos = login(port, "127.0.0.4", BOB, BOB_PW)
        return {
            "sources": sources,
            "parallel": parallel,
            "first_login": first,
            "judged": outcomes["judged"],
            "refused": outcomes["refused"],
            "other": sources - outcomes["judged"] - outcomes["refused"],
            "seconds": round(elapsed, 1),
            "judged_within_10s": sum(1 for t in judged_at if t <= 10),
            "owner_known_good": owner.get("known-good"),
            "owner_new_address": owner.get("new address"),
            "right_after_5_typos": after_typos,
        }
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, default=240)
    parser.add_argument("--parallel", type=int, default=240)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sources = max(1, min(args.sources, 1000))
    parallel = max(1, min(args.parallel, sources))
    import postoffice

    print(f"postoffice from {Path(postoffice.__file__).parent} (pid {os.getpid()})")
    r = run(sources, parallel)

    def shown(result: object) -> str:
        if not isinstance(result, tuple):
            return "-"
        code, took = result
        return f"{code} in {took:.2f} s"

    print(f"alice's first login (hash time): {shown(r['first_login'])}")
    print(
        f"{r['sources']} sources x 1 guess at alice ({r['parallel']} at a time):"
        f" {r['judged']} judged (535), {r['refused']} refused unjudged (454),"
        f" {r['other']} other; all answered in {r['seconds']} s;"
        f" {r['judged_within_10s']} judged within 10 s"
    )
    print(f"alice from her known-good address during the attack: {shown(r['owner_known_good'])}")
    print(f"alice from a new address during the attack: {shown(r['owner_new_address'])}")
    print(f"bob's right password after 5 typos from one address: {shown(r['right_after_5_typos'])}")
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
