"""A queued message as couriers read it: the file, from the start, each time.

A ``MessageSource`` (delivery/courier.py): a remote courier may read it once
per MX host it tries.  Reads run in the queue's worker threads, a chunk at a
time, so a large message never sits in memory whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import BinaryIO

from postoffice.delivery.content import MessageTraits
from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import (
    NO_MESSAGE_DSN,
    MessageDsn,
    RecipientDsn,
)

READ_CHUNK = 64 * 1024


def open_body_blocking(path: Path, offset: int) -> BinaryIO:
    """The ``.msg`` file at ``path``, positioned where the message starts."""
    fh = open(path, "rb")  # noqa: SIM115 - the caller closes it
    try:
        fh.seek(offset)
    except BaseException:
        fh.close()
        raise
    return fh


def _open_and_read(path: Path, offset: int, size: int) -> tuple[BinaryIO | None, bytes]:
    """Open the message and read its first ``size`` bytes; a message that
    fits is closed already (the file is then None)."""
    fh = open_body_blocking(path, offset)
    try:
        data = fh.read(size)
    except BaseException:
        fh.close()
        raise
    if len(data) < size:
        fh.close()
        return None, data
    return fh, data


def _read_more(fh: BinaryIO, size: int) -> bytes:
    data = fh.read(size)
    if len(data) < size:
        fh.close()
    return data


class QueuedMessage:
    def __init__(
        self,
        path: Path,
        offset: int,
        traits: MessageTraits,
        executor: Executor,
        whole: bytes | None = None,
        *,
        dsn: MessageDsn = NO_MESSAGE_DSN,
        rcpt_dsn: Mapping[Address, RecipientDsn] | None = None,
    ) -> None:
        """``path``/``offset``: the ``.msg`` file and where the message
        starts in it; ``whole``: the message, if it was read already (for
        the first pass only); ``dsn``, ``rcpt_dsn``: its DSN parameters."""
        self.dsn = dsn
        self._rcpt_dsn = rcpt_dsn or {}
        self._path = path
        self._offset = offset
        self._traits = traits
        self._executor = executor
        self._whole = whole

    @property
    def traits(self) -> MessageTraits:
        return self._traits

    def recipient_dsn(self, address: Address) -> RecipientDsn:
        return self._rcpt_dsn.get(address, RecipientDsn())

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        fh: BinaryIO | None
        if self._whole is not None:
            fh, chunk, self._whole = None, self._whole, None
        else:
            fh, chunk = await loop.run_in_executor(
                self._executor, _open_and_read, self._path, self._offset, READ_CHUNK
            )
        try:
            # Bounded by the file size: each pass reads one more chunk.
            for _ in range(1 << 40):
                if chunk:
                    yield chunk
                if fh is None or fh.closed:
                    return
                chunk = await loop.run_in_executor(self._executor, _read_more, fh, READ_CHUNK)
        finally:
            if fh is not None and not fh.closed:
                fh.close()
