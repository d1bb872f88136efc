"""IMAP loads for bench/run.py: one session of the shared ``imap-load.py``
(SELECT INBOX, ``UID FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE
BODYSTRUCTURE)``, ``BODY.PEEK[]`` of every message in chunks of 500), what
makes the next SELECT cold, an ``mbsync`` pull of the whole mailbox into an
empty local Maildir (and the re-sync that moves nothing), and the IDLE
notification latency under SMTP delivery (RFC 2177: the untagged EXISTS a
client in IDLE reads after a message arrives).

``imap-load.py`` is the shared bench's neutral client (imaplib, one
connection); for IMAPS it verifies no certificate (``ssl.CERT_NONE``), its
own choice, as the anchor's certificate is self-signed.  Measuring tools
beside postoffice, not part of it; loopback only.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib as bl

# The per-mailbox IMAP state each server keeps in the Maildir: postoffice's
# SQLite index (storage/sqlite_index.py, with -wal/-shm) and Dovecot's
# dovecot.index*, dovecot-uidlist, dovecot-uidvalidity* (maildir-fill.py
# --clean removes the same Dovecot names).
INDEX_PREFIXES = ("postoffice-imap.", "dovecot")


def forget_indexes(maildir: Path) -> None:
    """Remove the IMAP index files so that the next SELECT builds them from
    the Maildir, as after a delivery agent filled it (the "cold" SELECT).
    Only between sessions: no server has the mailbox open then."""
    for name in os.listdir(maildir):
        path = maildir / name
        if name.startswith(INDEX_PREFIXES) and path.is_file():
            path.unlink(missing_ok=True)


def load(bench: Path, port: int, tls: bool, count: int) -> dict[str, float]:
    """One imap-load.py session; its key=value lines as numbers.  The mailbox
    must hold exactly ``count`` messages and every body must come back (the
    anchor's ``load`` mailbox is shared with other benchmarkers)."""
    args = [
        sys.executable,
        str(bench / "imap-load.py"),
        "--port",
        str(port),
        "--user",
        bl.USER,
        "--password",
        bl.PASSWORD,
    ]
    if tls:
        args.append("--tls")
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"imap-load failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    kv = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            kv[key.strip()] = float(value)
    if kv.get("messages") != count or kv.get("body_msgs") != count:
        raise RuntimeError(
            f"port {port}: {kv.get('messages')} messages, {kv.get('body_msgs')} bodies,"
            f" not {count}: someone else is using that mailbox"
        )
    return kv


def select_seconds(port: int, count: int) -> float:
    """Seconds of one SELECT INBOX (plain, LOGIN first, not timed) of a mailbox
    of ``count`` messages: for mailboxes too big to FETCH all of in a
    benchmark (imap-load.py fetches everything after its SELECT)."""
    import imaplib
    import time

    client = imaplib.IMAP4("127.0.0.1", port, timeout=600)
    try:
        client.login(bl.USER, bl.PASSWORD)
        t0 = time.perf_counter()
        typ, data = client.select("INBOX", readonly=True)
        seconds = time.perf_counter() - t0
        got = data[0]
        if typ != "OK" or not isinstance(got, bytes) or int(got) != count:
            raise RuntimeError(f"port {port}: SELECT {typ} {data!r}, not {count} messages")
        return seconds
    finally:
        client.logout()


# --- mbsync ---------------------------------------------------------------------------------
def mbsync_rc(port: int, local: Path) -> Path:
    """An mbsyncrc that pulls INBOX of the bench user over plain IMAP into
    ``local/INBOX`` (``Sync Pull``: the server's flags are never changed, so
    each run meets the same mailbox).  Plain on loopback: both servers
    accept LOGIN without TLS from 127.0.0.1 (postoffice: ``[auth]
    allow_plaintext_loopback``; Dovecot: loopback counts as secured)."""
    rc = local / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount bench\nHost 127.0.0.1\nPort {port}\nUser {bl.USER}\n"
        f"Pass {bl.PASSWORD}\nSSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore bench-far\nAccount bench\n\n"
        f"MaildirStore bench-near\nPath {local}/\nInbox {local}/INBOX\n\n"
        "Channel bench\nFar :bench-far:\nNear :bench-near:\nPatterns INBOX\n"
        "Create Near\nSync Pull\nSyncState *\n"
    )
    rc.chmod(0o600)
    return rc


def mbsync_seconds(port: int, local: Path, count: int) -> tuple[float, float]:
    """(full sync s, no-change re-sync s) of ``mbsync -a`` against ``port``:
    the first into an empty ``local`` (removed and made anew), the second
    right after with the sync state the first left.  After each the local
    INBOX must hold exactly ``count`` files."""
    mbsync = shutil.which("mbsync")
    if mbsync is None:
        raise RuntimeError("mbsync (Debian package isync) is not installed")
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    args = [mbsync, "-q", "-c", str(mbsync_rc(port, local)), "-a"]
    times = []
    for what in ("full sync", "re-sync"):
        t0 = time.perf_counter()
        out = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise RuntimeError(f"mbsync {what} failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        got = len(bl.maildir_files(local / "INBOX"))
        if got != count:
            raise RuntimeError(f"port {port}: mbsync {what} left {got} files, not {count}")
    return times[0], times[1]


# --- IDLE notification latency ------------------------------------------------------------------
@dataclass
class IdleLatency:
    """Milliseconds from each message's SMTP 250 to the EXISTS that counts it,
    over every watching client; ``early``: notifications that came before
    the 250 (counted as 0 ms: the server stores before it answers)."""

    latencies_ms: list[float]
    sent: int
    early: int

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies_ms)


class IdleWatcher:
    """One raw-socket IMAP client: LOGIN, SELECT INBOX, IDLE; a thread
    records when each untagged ``* N EXISTS`` (RFC 9051 §7.4.1) arrives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.exists: list[tuple[int, float]] = []  # (N, perf_counter when read)
        self._line()  # greeting
        self._command(b"l", f'LOGIN "{bl.USER}" "{bl.PASSWORD}"'.encode())
        self.start_count = self._command(b"s", b"SELECT INBOX")
        self.sock.sendall(b"i IDLE\r\n")
        while not self._line().startswith(b"+"):
            pass
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("IMAP server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _command(self, tag: bytes, command: bytes) -> int:
        """Send, read to the tagged OK; the last EXISTS count seen (0: none)."""
        self.sock.sendall(tag + b" " + command + b"\r\n")
        count = 0
        for _ in range(10_000):  # bounded: a SELECT's untagged lines are few
            line = self._line()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(f"IMAP {command.split()[0]!r} refused: {line!r}")
                return count
            if line.startswith(b"* ") and line.endswith(b" EXISTS"):
                count = int(line.split()[1])
        raise RuntimeError("no tagged reply")

    def _read(self) -> None:
        try:
            while True:
                line = self._line()
                if line.startswith(b"* ") and line.endswith(b" EXISTS"):
                    self.exists.append((int(line.split()[1]), time.perf_counter()))
                elif line.startswith(b"i "):
                    return  # DONE answered
        except (OSError, RuntimeError, ValueError):
            return

    def seen(self) -> int:
        return self.exists[-1][0] if self.exists else self.start_count

    def close(self) -> None:
        try:
            self.sock.sendall(b"DONE\r\nz LOGOUT\r\n")
            self.thread.join(5)
        except OSError:
            pass
        self.sock.close()


def idle_latency(
    smtp_port: int, imap_port: int, rate: float = 20.0, seconds: float = 10.0, clients: int = 3
) -> IdleLatency:
    """Deliver ``rate`` messages a second for ``seconds`` over one SMTP
    session to the bench user while ``clients`` IDLE on its INBOX; per
    message and client, the time from the 250 to the EXISTS that first
    counts it.  Messages are matched by count (the i-th 250 with the first
    EXISTS reaching start + i): a delivery agent may store them out of
    order, the count a client sees is what it can act on.  Bounded: every
    EXISTS must come within 15 s of the last 250."""
    count = max(1, round(rate * seconds))
    watchers = [IdleWatcher(imap_port) for _ in range(clients)]
    acked: list[float] = []
    try:
        smtp = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
        try:
            smtp.ehlo("bench.example.test")
            t0 = time.perf_counter()
            for i in range(count):
                pause = t0 + i / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                body = (
                    f"From: bench@example.test\r\nTo: {bl.USER}\r\n"
                    f"Subject: idle {i}\r\nMessage-ID: <idle-{i}-{t0}@bench.example.test>\r\n"
                    "\r\n" + "x" * 1000 + "\r\n"
                )
                smtp.sendmail("bench@example.test", [bl.USER], body.encode())
                acked.append(time.perf_counter())
        finally:
            smtp.quit()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(w.seen() >= w.start_count + count for w in watchers):
                break
            time.sleep(0.05)
    finally:
        for w in watchers:
            w.close()
    latencies: list[float] = []
    early = 0
    for w in watchers:
        if w.seen() < w.start_count + count:
            raise RuntimeError(
                f"port {imap_port}: a client in IDLE saw {w.seen() - w.start_count} of {count}"
            )
        for i, t_ack in enumerate(acked):
            t_seen = next(t for n, t in w.exists if n >= w.start_count + i + 1)
            early += t_seen < t_ack
            latencies.append(max(0.0, t_seen - t_ack) * 1000)
    return IdleLatency(latencies, count, early)
