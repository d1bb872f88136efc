#!/usr/bin/env python3
"""Hostile DKIM keys: time to verdict and event-loop stall (issue 11, item 4).

    python bench/dkim_stall.py [--bits 16384] [--signatures 5] [--runs 1] [--deadline 180]

An attacker publishes an RSA key whose modulus and exponent are both
``--bits`` long and signs with random bytes (tests/support/hostile_dkim.py).
This starts dnsmasq on 127.0.0.1 serving those keys (``s0``, ``s1``, ...
``._domainkey.evil.test``; evil.test has ``p=reject`` and SPF ``-all``) and
a postoffice whose smtp listener judges clients on 127.0.0.1
(``[checks] exempt_networks = ["127.0.0.9/32"]``).  Per run:

1. a probe client on 127.0.0.9 (exempt: no DNS, no checks) opens a session
   and gets as far as the end of a message's DATA;
2. the attacker's message with ``--signatures`` hostile signatures is sent
   from 127.0.0.1, and right after it the probe ends its DATA;
3. until the attacker's message is answered the probe sends NOOP every
   20 ms.

Printed per run: the attacker's reply and its time to verdict, the probe
delivery's reply time, and the longest NOOP round trip while the attacker's
message was judged (the event-loop stall others see).

Which code runs is the interpreter's choice: to measure another tree,
``PYTHONPATH=/tmp/mailauth-before/src python bench/dkim_stall.py``; the
first line says which ``postoffice`` the server imported.  Loopback only;
every wait is bounded by ``--deadline``; every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.dns import auth_dns
from tests.support.hostile_dkim import hostile_key, hostile_signatures
from tests.support.server import PostofficeServer
from tests.support.smtp import RawSmtp

BOB = "bob@receiver.test"
PROBE_SOURCE = "127.0.0.9"


@dataclass
class Run:
    verdict: str = ""
    verdict_seconds: float = float("nan")
    probe_delivery_seconds: float = float("nan")
    noop_max_seconds: float = 0.0
    noops: int = 0
    errors: list[str] = field(default_factory=list)


def hostile_message(signatures: int, modulus: int) -> bytes:
    msg = (
        b"From: CEO <ceo@evil.test>\nTo: bob@receiver.test\nSubject: wire transfer\n"
        b"Date: Mon, 06 Jan 2025 10:00:00 +0000\nMessage-ID: <stall@evil.test>\n\nPay now.\n"
    )
    selectors = [f"s{i}" for i in range(signatures)]
    return hostile_signatures(msg, "evil.test", selectors, modulus) + msg


def crlf(msg: bytes) -> bytes:
    return msg.replace(b"\n", b"\r\n")


def one_run(srv: PostofficeServer, message: bytes, deadline: float) -> Run:
    run = Run()
    port = srv.ports["smtp"]
    probe = RawSmtp("127.0.0.1", port, timeout=deadline, source=PROBE_SOURCE)
    attacker = RawSmtp("127.0.0.1", port, timeout=deadline, source="127.0.0.1")
    for client in (probe, attacker):  # no Nagle delay between a message and its "."
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for client, sender in ((probe, "probe@elsewhere.test"), (attacker, "ceo@evil.test")):
            assert client.reply()[0] == 220
            assert client.cmd("EHLO client.test")[0] == 250
            assert client.cmd(f"MAIL FROM:<{sender}>")[0] == 250
            assert client.cmd(f"RCPT TO:<{BOB}>")[0] == 250
            assert client.cmd("DATA")[0] == 354
        probe.send(b"Subject: probe\r\n\r\nprobe\r\n")
        attacker.send(crlf(message))
        answered = threading.Event()

        def attack() -> None:
            start = time.monotonic()
            try:
                code, lines = attacker.cmd(".")
                run.verdict = f"{code} {lines[-1]}"
            except OSError as exc:
                run.verdict = f"no reply: {exc}"
            run.verdict_seconds = time.monotonic() - start
            answered.set()

        thread = threading.Thread(target=attack)
        thread.start()
        time.sleep(0.05)  # the attacker's end of data is in first
        start = time.monotonic()
        code, _ = probe.cmd(".")
        run.probe_delivery_seconds = time.monotonic() - start
        if code != 250:
            run.errors.append(f"probe delivery answered {code}")
        end = time.monotonic() + deadline
        while not answered.is_set() and time.monotonic() < end:
            start = time.monotonic()
            probe.cmd("NOOP")
            run.noop_max_seconds = max(run.noop_max_seconds, time.monotonic() - start)
            run.noops += 1
            answered.wait(0.02)
        thread.join(deadline)
    finally:
        probe.close()
        attacker.close()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bits", type=int, default=16384)
    parser.add_argument("--signatures", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds, per wait")
    args = parser.parse_args()
    which = subprocess.run(
        [sys.executable, "-c", "import postoffice; print(postoffice.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    print(f"server code: {which}")
    record, modulus = hostile_key(args.bits)
    root = Path(tempfile.mkdtemp(prefix="dkim-stall-"))
    (root / "dns").mkdir()
    dns = auth_dns(
        root / "dns",
        txt={
            "evil.test": "v=spf1 -all",
            "_dmarc.evil.test": "v=DMARC1; p=reject",
            **{f"s{i}._domainkey.evil.test": record for i in range(args.signatures)},
        },
    ).start()
    srv = PostofficeServer(
        root / "server",
        domains=("receiver.test",),
        hostname="mx.receiver.test",
        sections={
            "checks": {"exempt_networks": [f"{PROBE_SOURCE}/32"]},
            "relay": {"dns_servers": [dns.server]},
        },
    )
    try:
        srv.add_user(BOB, "bob-password-3")
        srv.start()
        message = hostile_message(args.signatures, modulus)
        print(
            f"{args.signatures} signatures, n and e of {args.bits} bits; "
            f"message {len(message)} octets; {os.cpu_count()} CPUs"
        )
        print("| run | verdict | time to verdict | probe delivery | longest NOOP | NOOPs |")
        print("|---|---|---|---|---|---|")
        for i in range(args.runs):
            r = one_run(srv, message, args.deadline)
            print(
                f"| {i + 1} | {r.verdict} | {r.verdict_seconds:.3f} s "
                f"| {r.probe_delivery_seconds:.3f} s | {r.noop_max_seconds:.3f} s | {r.noops} |"
                + (f" {'; '.join(r.errors)}" if r.errors else "")
            )
    finally:
        srv.stop(timeout=args.deadline)
        dns.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
