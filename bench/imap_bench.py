"""IMAP read loads for bench/run.py: one session of the shared ``imap-load.py``
(SELECT INBOX, ``UID FETCH 1:* (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE
BODYSTRUCTURE)``, ``BODY.PEEK[]`` of every message in chunks of 500), and
what makes the next SELECT cold.

``imap-load.py`` is the shared bench's neutral client (imaplib, one
connection); for IMAPS it verifies no certificate (``ssl.CERT_NONE``), its
own choice, as the anchor's certificate is self-signed.  Measuring tools
beside postoffice, not part of it; loopback only.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
