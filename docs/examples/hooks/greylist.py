"""Greylisting (docs/filters.md, example 1).

The first attempt of an unknown (client network, sender, recipient)
triplet gets a temporary failure; a real MTA retries after a while and is
let through, spam cannons rarely do.  The triplets live in SQLite so every
smtp process sees the same ones and a restart forgets nothing.

    [filters]
    hooks = ["greylist:Greylist"]   # this directory on the server's PYTHONPATH

Environment: GREYLIST_DB (the SQLite file, default /var/lib/postoffice/greylist.sqlite3),
GREYLIST_DELAY (seconds before a retry passes, default 300).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sqlite3
import time

from postoffice.filters.interface import SessionFacts
from postoffice.filters.verdicts import Tempfail


class Greylist:
    def __init__(self) -> None:
        self.db_path = os.environ.get("GREYLIST_DB", "/var/lib/postoffice/greylist.sqlite3")
        self.delay = float(os.environ.get("GREYLIST_DELAY", "300"))
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS triplet"
                " (key TEXT PRIMARY KEY, first_seen REAL NOT NULL)"
            )

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=5)

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> Tempfail | None:
        if facts.auth_user:
            return None  # our own users' submissions are never greylisted
        # A /24 (IPv6: /64): big senders retry from another host of the same farm.
        prefix = 24 if ":" not in facts.client_address else 64
        network = ipaddress.ip_network(f"{facts.client_address}/{prefix}", strict=False)
        key = f"{network}|{facts.sender.lower()}|{recipient.lower()}"
        first_seen = await asyncio.to_thread(self._first_seen, key)
        waited = time.time() - first_seen
        if waited >= self.delay:
            return None
        return Tempfail(451, f"Greylisted, try again in {int(self.delay - waited) + 1} s", "4.7.1")

    def _first_seen(self, key: str) -> float:
        """When the triplet was first seen (now, if never): a thread's work."""
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO triplet (key, first_seen) VALUES (?, ?)",
                (key, time.time()),
            )
            row = db.execute("SELECT first_seen FROM triplet WHERE key = ?", (key,)).fetchone()
        return float(row[0])
