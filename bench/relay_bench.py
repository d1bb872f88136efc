#!/usr/bin/env python3
"""Relay throughput: submitted mail in, relayed out, next to Postfix on the same box.

One load, two servers.  A client submits MESSAGES messages (SIZE bytes of
body, SESSIONS parallel connections, STARTTLS + AUTH PLAIN, as a mail user
agent does) addressed to remote recipients; each server relays them to the
same receiving MTA, Postfix's smtp-sink on 127.0.0.1:SINK_PORT, which dumps
each transaction to a file on tmpfs.  We time

* ack: until the client had the last 250 after DATA (queued durably);
* e2e: until the sink had received every message (relayed).

postoffice is started by this script (a temporary data dir, ``[relay]
smarthost`` = the sink, user load@example.test), and stopped by its PID.
Postfix is the bench anchor stack (../shared/bench/anchor-stack.sh) run as
a second instance whose relayhost is the sink, e.g.::

    ANCHOR_ROOT=/tmp/anchor-relay ANCHOR_SMTP_PORT=11025 ANCHOR_SUBMISSION_PORT=11587 \\
    ANCHOR_POP3_PORT=11110 ANCHOR_POP3S_PORT=11995 ANCHOR_RELAYHOST='[127.0.0.1]:12526' \\
        ../shared/bench/anchor-stack.sh up
    python3 bench/relay_bench.py --postfix 127.0.0.1:11587 --sink-port 12526 --runs 3

Runs alternate (postoffice, Postfix, postoffice, ...) so drift hits both; the
summary gives medians [min-max] and the median of the pairwise wall ratios.
Only loopback addresses are used.

Results: an early figure (4 sessions, before the queue's group commit) is
superseded; the current side-by-side figure is the ``relay-20x10k`` row of
``bench/run.py`` (20 sessions x 10 KiB, STARTTLS+AUTH), which calls
``run_once`` here.  On the 2-vCPU bench VM at commit e1b0985 it gave
postoffice 657 msg/s against Postfix 466 (pairwise ratio 1.42).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from dataclasses import dataclass
from pathlib import Path

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its reaped children (clock ticks -> s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the receiving MTA -----------------------------------------------------------------
class Sink:
    def __init__(self, port: int) -> None:
        self.port = port
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.dir = Path(tempfile.mkdtemp(prefix="relay-sink-", dir=base))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "root", "-d", f"{self.dir}/m.", f"127.0.0.1:{self.port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.dir))

    def clear(self) -> None:
        for entry in os.scandir(self.dir):
            os.unlink(entry.path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- postoffice under test ----------------------------------------------------------------
class Postoffice:
    def __init__(self, sink_port: int, log_level: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relay-po-"))
        self.port = free_port()
        self.config = self.root / "postoffice.toml"
        self.config.write_text(
            'hostname = "mail.example.test"\n'
            f'data_dir = "{self.root / "data"}"\n'
            'domains = ["example.test"]\n'
            "[listen]\n"
            f'submission = ["127.0.0.1:{self.port}"]\n'
            "smtp = []\nsubmissions = []\npop3 = []\npop3s = []\n"
            "[relay]\n"
            f'smarthost = "127.0.0.1:{sink_port}"\n'
            "max_per_destination = 20\n"
        )
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        po = [sys.executable, "-m", "postoffice", "-c", str(self.config)]
        subprocess.run([*po, "init"], check=True, capture_output=True)
        subprocess.run(
            [*po, "user", "add", "load@example.test", "--password-stdin"],
            input=b"secret-pass-load\n",
            check=True,
            capture_output=True,
        )
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postoffice", "serve", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "POSTOFFICE_LOG_LEVEL": self.log_level},
        )
        log.close()
        wait_port(self.port)

    def queue_empty(self) -> bool:
        qdir = self.root / "data" / "queue"
        return not any(p.suffix == ".msg" for p in qdir.iterdir()) if qdir.is_dir() else True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


# --- the load ------------------------------------------------------------------------------
class Client:
    """Just enough SMTP for submission: STARTTLS, AUTH PLAIN, PIPELINING."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> tuple[int, str]:
        lines = []
        for _ in range(200):
            line = (await asyncio.wait_for(self.reader.readline(), 120)).decode()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line[4:].strip())
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)
        raise ConnectionError("endless reply")

    async def cmd(self, line: str, expect: int) -> str:
        self.writer.write(line.encode() + b"\r\n")
        code, text = await self.reply()
        if code != expect:
            raise RuntimeError(f"{line.split()[0]}: {code} {text}")
        return text


async def session(
    host: str, port: int, user: str, password: str, count: int, body: bytes, first: int
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    c = Client(reader, writer)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        await c.reply()
        await c.cmd("EHLO load.test", 250)
        await c.cmd("STARTTLS", 220)
        await writer.start_tls(ctx)
        ehlo = await c.cmd("EHLO load.test", 250)
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await c.cmd(f"AUTH PLAIN {token}", 235)
        pipelining = "PIPELINING" in ehlo.upper()
        for i in range(first, first + count):
            head = (
                f"From: <{user}>\r\nTo: <r{i}@remote.test>\r\nSubject: relay {i}\r\n"
                f"Message-ID: <relay{i}.{time.time_ns()}@load.test>\r\n\r\n"
            ).encode()
            envelope = [f"MAIL FROM:<{user}>", f"RCPT TO:<r{i}@remote.test>", "DATA"]
            if pipelining:
                writer.write("".join(f"{e}\r\n" for e in envelope).encode())
                codes = [(await c.reply())[0] for _ in envelope]
                if codes != [250, 250, 354]:
                    raise RuntimeError(f"envelope refused: {codes}")
            else:
                await c.cmd(envelope[0], 250)
                await c.cmd(envelope[1], 250)
                await c.cmd(envelope[2], 354)
            writer.write(head + body + b".\r\n")
            code, text = await c.reply()
            if code != 250:
                raise RuntimeError(f"DATA: {code} {text}")
        await c.cmd("QUIT", 221)
    finally:
        writer.close()


def make_body(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return line * max(1, size // len(line))


async def load(
    host: str, port: int, user: str, password: str, messages: int, size: int, sessions: int
) -> None:
    body = make_body(size)
    per, extra = divmod(messages, sessions)
    tasks, first = [], 0
    for s in range(sessions):
        n = per + (1 if s < extra else 0)
        tasks.append(session(host, port, user, password, n, body, first))
        first += n
    await asyncio.gather(*tasks)


@dataclass
class Result:
    ack_s: float
    e2e_s: float
    delivered: int
    cpu_s: float | None


def run_once(
    host: str,
    port: int,
    user: str,
    password: str,
    sink: Sink,
    args: argparse.Namespace,
    pid: int | None,
) -> Result:
    sink.clear()
    cpu0 = cpu_seconds(pid) if pid else None
    start = time.monotonic()
    asyncio.run(load(host, port, user, password, args.messages, args.size, args.sessions))
    ack = time.monotonic() - start
    deadline = start + args.timeout
    while sink.count() < args.messages and time.monotonic() < deadline:
        time.sleep(0.02)
    e2e = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu0 if pid and cpu0 is not None else None
    return Result(ack, e2e, sink.count(), cpu)


def summary(label: str, results: list[Result], messages: int) -> str:
    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"

    ack = [messages / r.ack_s for r in results]
    e2e = [messages / r.e2e_s for r in results]
    text = f"{label:<11} ack msg/s {med(ack):<22} e2e msg/s {med(e2e):<22}"
    text += f" delivered {min(r.delivered for r in results)}/{messages}"
    cpus = [r.cpu_s for r in results if r.cpu_s is not None]
    if cpus:
        text += f"  server CPU {statistics.median(cpus) / messages * 1000:.2f} ms/msg"
    return text


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=10240, help="body bytes per message")
    p.add_argument("--sessions", type=int, default=4, help="parallel client connections")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="max seconds per run")
    p.add_argument(
        "--sink-port", type=int, default=0, help="where the sink listens (Postfix's relayhost)"
    )
    p.add_argument(
        "--postfix", metavar="HOST:PORT", help="anchor Postfix submission port to compare"
    )
    p.add_argument("--postfix-user", default="load@example.test")
    p.add_argument("--postfix-password", default="secret-pass-load")
    p.add_argument("--log-level", default="INFO", help="postoffice's POSTOFFICE_LOG_LEVEL")
    args = p.parse_args()
    if args.messages > 100_000:
        p.error("--messages is capped at 100000")
    sink = Sink(args.sink_port or free_port())
    po = Postoffice(sink.port, args.log_level)
    results: dict[str, list[Result]] = {"postoffice": [], "postfix": []}
    try:
        sink.start()
        po.start()
        for run in range(args.runs):
            r = run_once(
                "127.0.0.1",
                po.port,
                "load@example.test",
                "secret-pass-load",
                sink,
                args,
                po.proc.pid if po.proc else None,
            )
            results["postoffice"].append(r)
            print(
                f"run {run + 1} postoffice: ack {r.ack_s:.2f}s e2e {r.e2e_s:.2f}s "
                f"delivered {r.delivered}",
                flush=True,
            )
            if args.postfix:
                host, _sep, port = args.postfix.rpartition(":")
                if not host.startswith("127."):
                    p.error("--postfix must be a loopback address")
                r = run_once(
                    host, int(port), args.postfix_user, args.postfix_password, sink, args, None
                )
                results["postfix"].append(r)
                print(
                    f"run {run + 1} postfix:    ack {r.ack_s:.2f}s e2e {r.e2e_s:.2f}s "
                    f"delivered {r.delivered}",
                    flush=True,
                )
    finally:
        po.stop()
        sink.stop()
    print(
        f"\n{args.messages} messages x {args.size} B, {args.sessions} sessions, "
        f"STARTTLS+AUTH submission, relayed to smtp-sink; median [min-max] of {args.runs}"
    )
    print(summary("postoffice", results["postoffice"], args.messages))
    if results["postfix"]:
        print(summary("postfix", results["postfix"], args.messages))
        ratios = [
            a.e2e_s / b.e2e_s
            for a, b in zip(results["postoffice"], results["postfix"], strict=True)
        ]
        print(
            f"e2e wall postoffice/postfix: {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] ({len(ratios)} pairs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
