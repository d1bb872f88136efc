"""Per-user spam training: IMAP moves into and out of Junk teach rspamd.

Why: Dovecot sites wire IMAPSieve scripts to rspamd's controller so that a
user's "this is spam" (a move into Junk) and "this is not" (a move out of
it) train the bayes classifier.  ``SpamLearner`` does that built in when
``[filters] rspamd_controller`` is set: the IMAP session hands over open
files of the moved messages and goes on at once; the POSTs to
``/learnspam`` / ``/learnham`` run as background tasks, each bounded in
time, their number bounded too (beyond it, messages are not learned and a
line is logged), the body streamed from the file, never read whole.

The controller password, if rspamd has one, is the URL's userinfo
(``http://:secret@127.0.0.1:11334``); it goes in rspamd's ``Password``
header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Sequence
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlsplit

log = logging.getLogger("postoffice.filters.learn")

Kind = Literal["spam", "ham"]
MAX_PENDING = 64  # learn requests in flight or waiting, per process
MAX_LEARN_PER_COMMAND = 100  # messages of one COPY/MOVE learned; the rest are not
MAX_LEARN_SIZE = 32 * 1024 * 1024  # rspamd's own default max_message is 50 MB
_CHUNK = 64 * 1024


class LearnError(Exception):
    """The controller did not take the message."""


class SpamLearner:
    """Sends messages to an rspamd controller's learn endpoints, in the background."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._password = unquote(parts.password or "")
        self._base = parts.path.rstrip("/")
        self._timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self.learned = 0  # replies of 200 (tests and metrics)

    def learn(self, kind: Kind, messages: Sequence[BinaryIO]) -> None:
        """Schedule one POST per open message file; the files are closed after."""
        for f in messages:
            if len(self._tasks) >= MAX_PENDING:
                log.warning("learn %s: too many requests pending, message not learned", kind)
                f.close()
                continue
            task = asyncio.get_running_loop().create_task(self._learn_one(kind, f))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Until every scheduled request has finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _learn_one(self, kind: Kind, f: BinaryIO) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._post(f"{self._base}/learn{kind}", f)
            # 208: rspamd has learned this very message already - fine.
            if status in (200, 208):
                self.learned += status == 200
                log.info("learn %s: rspamd answered %d", kind, status)
            else:
                log.warning("learn %s: rspamd answered %d %s", kind, status, body[:200])
        except Exception as exc:  # a background task: log, never raise
            log.warning("learn %s: %s", kind, exc or type(exc).__name__)
        finally:
            f.close()

    async def _post(self, path: str, f: BinaryIO) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        size = (await loop.run_in_executor(None, os.fstat, f.fileno())).st_size
        if size > MAX_LEARN_SIZE:
            raise LearnError(f"message of {size} octets not sent for learning")
        context = ssl.create_default_context() if self._tls else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context)
        try:
            head = [
                f"POST {path or '/'} HTTP/1.1",
                f"Host: {self._host}:{self._port}",
                f"Content-Length: {size}",
                "Connection: close",
            ]
            if self._password:
                head.append(f"Password: {self._password}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            sent = 0
            while sent < size:
                chunk = await loop.run_in_executor(None, f.read, min(_CHUNK, size - sent))
                if not chunk:
                    raise LearnError("message file shrank while being sent")
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            status_line = await reader.readline()
            fields = status_line.split()
            if len(fields) < 2 or not fields[1].isdigit():
                raise LearnError(f"bad HTTP answer {status_line[:80]!r}")
            reply = await reader.read(4096)  # headers and the start of the JSON: enough
            return int(fields[1]), reply.decode("utf-8", "replace").partition("\r\n\r\n")[2]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def learn_kind(source_special: str | None, target_special: str | None) -> Kind | None:
    """A move or copy into Junk is spam; out of Junk (except to Trash) is ham."""
    if target_special == "\\Junk" and source_special != "\\Junk":
        return "spam"
    if source_special == "\\Junk" and target_special not in ("\\Junk", "\\Trash"):
        return "ham"
    return None
