"""Requests to the delivering server, left as files in the queue directory.

Why files: the asker is another process (``postoffice queue flush``, or an
extra smtp process that queues but does not deliver), and the request must
survive until the server is there to take it.  The server polls for them
(delivery/outbound.py, every POLL_INTERVAL); each is taken once.  Blocking
calls: the server runs them in its worker threads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from postoffice.delivery.queue.records import QUEUE_ID

FLUSH_FILE = "flush"  # queue/flush: retry every message now
ADOPT_SUFFIX = ".adopt"  # queue/<id>.adopt: queued by another process, deliver it


class QueueRequests:
    def __init__(self, queue_dir: Path) -> None:
        self.dir = queue_dir

    def request_flush_blocking(self) -> Path:
        """Ask for a flush; the file that stands for the request (gone once taken)."""
        path = self.dir / FLUSH_FILE
        path.write_bytes(b"")
        return path

    def take_flush_request_blocking(self) -> bool:
        try:
            os.unlink(self.dir / FLUSH_FILE)
        except FileNotFoundError:
            return False
        return True

    def request_adoption_blocking(self, queue_id: str) -> None:
        """From a process that queues but does not deliver (an extra smtp
        process): ask the delivering server to take ``queue_id`` on."""
        (self.dir / f"{queue_id}{ADOPT_SUFFIX}").touch()

    def take_adoption_requests_blocking(self) -> list[str]:
        """The queue ids other processes asked this server to deliver (once)."""
        ids = []
        for path in self.dir.glob(f"*{ADOPT_SUFFIX}"):
            with contextlib.suppress(OSError):
                os.unlink(path)
                queue_id = path.name[: -len(ADOPT_SUFFIX)]
                if QUEUE_ID.fullmatch(queue_id):
                    ids.append(queue_id)
        return ids
