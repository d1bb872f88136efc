"""Milters (rspamd, OpenDKIM, ClamAV...) as ``Filter``\\ s: the asyncio side.

Why: ``protocol.milter`` knows the packets; this module owns the socket
(one per SMTP connection, ``inet:``/``inet6:``/``unix:``), the per-stage
timeouts, the macros built from ``SessionFacts``, the body streamed from
the spooled file, and the mapping of the milter's answers onto
``filters.verdicts``.  Any failure (refused connection, timeout, garbage,
a close mid-body) is raised: the chain then applies this milter's
``default_action``, and the session stays failed so later stages do not
wait for a dead peer again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import cast

from postoffice.config.settings import MilterSettings
from postoffice.filters import verdicts as v
from postoffice.filters.interface import (
    DeliveryReport,
    FilterSession,
    SessionFacts,
    SpooledMessage,
)
from postoffice.protocol import milter as m
from postoffice.protocol.errors import RemoteProtocolError

# Read the LF-stored body in pieces whose CRLF form still fits one BODY
# packet (every byte an LF doubles).
_READ_CHUNK = m.BODY_CHUNK // 2
# A replaced body larger than this goes to a file instead of memory.
_REPLBODY_IN_MEMORY = 256 * 1024
# Modifications one end-of-message answer may carry.
_MAX_MODIFICATIONS = 10000


class MilterFailure(Exception):
    """The milter broke off, timed out or said it is shutting down."""


def parse_address(address: str) -> tuple[str, str, int]:
    """("inet", host, port) or ("unix", path, 0) from the config string."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return "unix", rest, 0
    host, _, port = rest.rpartition(":")
    return "inet", host.strip("[]"), int(port)


def _angle(address: str) -> str:
    return f"<{address}>"


def _bare(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


def _macros(facts: SessionFacts, **extra: str) -> dict[str, str]:
    """What sendmail/Postfix define, from the facts; empty ones left out
    (rspamd takes a present ``{auth_authen}`` as authenticated)."""
    values = {
        "j": facts.hostname,
        "{daemon_name}": facts.listener,
        "_": f"{facts.client_name or 'unknown'} [{facts.client_address}]",
        "{client_addr}": facts.client_address,
        "{client_port}": str(facts.client_port),
        "{client_name}": facts.client_name or f"[{facts.client_address}]",
        "{tls_version}": facts.tls_version,
        "{cipher}": facts.tls_cipher,
        "{auth_authen}": facts.auth_user,
        "i": facts.queue_id,
        **extra,
    }
    return {k: val for k, val in values.items() if val}


class MilterFilter:
    """A configured milter; ``open`` connects and negotiates per SMTP connection."""

    def __init__(self, settings: MilterSettings) -> None:
        self.settings = settings

    @property
    def name(self) -> str:
        return f"milter {self.settings.address}"

    @property
    def default_action(self) -> str:
        return self.settings.default_action

    async def open(self, facts: SessionFacts) -> FilterSession:
        kind, where, port = parse_address(self.settings.address)
        timeout = self.settings.connect_timeout
        async with asyncio.timeout(timeout):
            if kind == "unix":
                reader, writer = await asyncio.open_unix_connection(where)
            else:
                reader, writer = await asyncio.open_connection(where, port)
        session = MilterSession(self.settings, reader, writer)
        try:
            await session.negotiate()
        except BaseException:
            await session.close()
            raise
        return session

    async def aclose(self) -> None:
        return None


class MilterSession:
    """One milter conversation for one SMTP connection."""

    def __init__(
        self,
        settings: MilterSettings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._writer = writer
        self._core = m.MilterClient()
        self._failed = False
        self._closed = False
        # The milter's "accept": nothing more to ask for the connection
        # (at connect/helo) or for this message (later stages).
        self._accepted_connection = False
        self._accepted_message = False
        self._spill: list[Path] = []

    # --- wire -------------------------------------------------------------------

    async def negotiate(self) -> m.Negotiated:
        async with asyncio.timeout(self._settings.connect_timeout):
            self._writer.write(self._core.start())
            await self._writer.drain()
            event = await self._read_event()
        assert isinstance(event, m.Negotiated)
        return event

    async def _read_event(self) -> m.Event:
        # Bounded by the caller's timeout and by the core's max_packet.
        while (event := self._core.next_event()) is None:
            data = await self._reader.read(m.BODY_CHUNK + 16)
            if not data:
                raise MilterFailure("milter closed the connection")
            self._core.receive_data(data)
        return event

    async def _send(self, data: bytes, timeout: float) -> None:
        if not data:
            return
        async with asyncio.timeout(timeout):
            self._writer.write(data)
            await self._writer.drain()

    async def _answer(self, timeout: float) -> m.Event | None:
        """The milter's reply to what was just sent, or None if none is due.
        ``Progress`` restarts the timeout (bounded by the packet count)."""
        if not self._core.awaiting_reply:
            return None
        for _ in range(_MAX_MODIFICATIONS):
            async with asyncio.timeout(timeout):
                event = await self._read_event()
            if not isinstance(event, m.Progress):
                return event
        raise MilterFailure("milter sent progress without end")

    async def _stage(self, data: bytes, timeout: float | None = None) -> v.FilterResult:
        if self._failed or self._closed:
            raise MilterFailure("milter session already failed")
        try:
            await self._send(data, timeout or self._settings.command_timeout)
            event = await self._answer(timeout or self._settings.command_timeout)
        except BaseException:
            self._failed = True
            raise
        if event is None:
            return v.ACCEPTED
        return v.FilterResult(self._verdict(event))

    def _verdict(self, event: m.Event) -> v.Verdict:
        if isinstance(event, m.Continue):
            return v.ACCEPT
        if isinstance(event, m.Accept):
            self._accepted_message = True
            return v.ACCEPT
        if isinstance(event, m.Reject):
            return v.Reject()
        if isinstance(event, m.Tempfail):
            return v.Tempfail()
        if isinstance(event, m.Discard):
            return v.Discard("discarded by milter")
        if isinstance(event, m.ReplyCode):
            text = " ".join(event.lines) or "refused by filter"
            if event.permanent:
                return v.Reject(event.code, text, event.enhanced)
            return v.Tempfail(event.code, text, event.enhanced)
        self._failed = True
        if isinstance(event, m.Shutdown):
            raise MilterFailure("milter is shutting down")
        raise RemoteProtocolError(f"milter: unexpected {event!r}")

    def _skip(self) -> bool:
        return self._accepted_connection or self._accepted_message

    # --- FilterSession ------------------------------------------------------------

    async def connect(self, facts: SessionFacts) -> v.FilterResult:
        family = "6" if ":" in facts.client_address else "4"
        hostname = facts.client_name or f"[{facts.client_address}]"
        data = self._core.connect(
            hostname, family, facts.client_port, facts.client_address, _macros(facts)
        )
        result = await self._stage(data)
        self._promote_accept()
        return result

    async def helo(self, facts: SessionFacts, name: str) -> v.FilterResult:
        if self._skip():
            return v.ACCEPTED
        result = await self._stage(self._core.helo(name, _macros(facts)))
        self._promote_accept()
        return result

    def _promote_accept(self) -> None:
        # "accept" before any message covers the whole connection.
        if self._accepted_message:
            self._accepted_connection = True

    async def mail(self, facts: SessionFacts, sender: str, args: str) -> v.FilterResult:
        self._accepted_message = False
        if self._skip():
            return v.ACCEPTED
        macros = _macros(facts, **{"{mail_addr}": sender})
        return await self._stage(self._core.mail([_angle(sender), *args.split()], macros))

    async def rcpt(self, facts: SessionFacts, recipient: str, args: str) -> v.FilterResult:
        if self._skip():
            return v.ACCEPTED
        macros = _macros(facts, **{"{mail_addr}": facts.sender, "{rcpt_addr}": recipient})
        data = self._core.rcpt([_angle(recipient), *args.split()], macros)
        return await self._stage(data)

    async def message(self, facts: SessionFacts, message: SpooledMessage) -> v.FilterResult:
        if self._skip():
            return v.ACCEPTED
        macros = _macros(facts, **{"{mail_addr}": message.sender})
        result = await self._stage(self._core.data(macros))
        if result.verdict != v.ACCEPT or self._skip():
            return result
        for name, value in message.headers:
            # The core drops this space again unless the milter asked for it.
            result = await self._stage(self._core.header(name, " " + value))
            if result.verdict != v.ACCEPT or self._skip():
                return result
        result = await self._stage(self._core.eoh(macros))
        if result.verdict != v.ACCEPT or self._skip():
            return result
        if self._core.wants(m.SMFIC_BODY):
            # aclosing: leaving early (SKIP, a verdict, a failure) closes the
            # spooled file now, not whenever the generator is collected.
            # (body_chunks is an async generator, typed as a plain iterator.)
            gen = cast(AsyncGenerator[bytes, None], message.body_chunks(_READ_CHUNK))
            async with contextlib.aclosing(gen) as chunks:
                async for chunk in chunks:
                    data = self._core.body(chunk.replace(b"\n", b"\r\n"))
                    if not data:
                        break  # SKIP
                    result = await self._stage(data)
                    if result.verdict != v.ACCEPT or self._skip():
                        return result
        return await self._end_of_message(macros, message)

    async def _end_of_message(
        self, macros: Mapping[str, str], message: SpooledMessage
    ) -> v.FilterResult:
        if self._failed or self._closed:
            raise MilterFailure("milter session already failed")
        timeout = self._settings.eom_timeout
        mods: list[v.Modification] = []
        quarantine: v.Quarantine | None = None
        body = _BodyCollector(message.path.parent, self._spill)
        try:
            await self._send(self._core.eom(macros), timeout)
            for _ in range(_MAX_MODIFICATIONS):
                event = await self._answer(timeout)
                if isinstance(event, m.ReplaceBody):
                    await body.add(event.chunk)
                elif isinstance(event, m.Quarantine):
                    quarantine = v.Quarantine(event.reason or "quarantined by milter")
                elif isinstance(event, m.Final):
                    break
                elif event is not None:
                    mods.append(self._modification(event))
            else:
                raise MilterFailure("too many modifications")
            assert event is not None
        except BaseException:
            self._failed = True
            await body.discard()
            raise
        verdict = self._verdict(event)
        if body.used:
            mods.append(v.ReplaceBody(await body.finish()))
        if quarantine is not None and verdict == v.ACCEPT:
            verdict = quarantine
        return v.FilterResult(verdict, tuple(mods))

    def _modification(self, event: m.Event) -> v.Modification:
        def value(text: str) -> str:
            # The core gives values as after the colon; verdicts want the
            # leading space removed, like SpooledMessage.headers.
            return text[1:] if text.startswith(" ") else text

        if isinstance(event, m.AddHeader):
            return v.AddHeader(event.name, value(event.value))
        if isinstance(event, m.InsertHeader):
            return v.AddHeader(event.name, value(event.value), event.index)
        if isinstance(event, m.ChangeHeader):
            new = "" if event.value is None else value(event.value)
            return v.ChangeHeader(event.name, max(event.index, 1), new)
        if isinstance(event, m.AddRecipient):
            return v.AddRecipient(_bare(event.address), event.args)
        if isinstance(event, m.DeleteRecipient):
            return v.DeleteRecipient(_bare(event.address))
        if isinstance(event, m.ChangeSender):
            return v.ChangeSender(_bare(event.address), event.args)
        raise RemoteProtocolError(f"milter: unexpected {event!r} at end of message")

    async def delivered(self, facts: SessionFacts, report: DeliveryReport) -> None:
        await self._remove_spill()

    async def abort(self) -> None:
        self._accepted_message = False
        await self._remove_spill()
        if self._failed or self._closed or self._core.negotiated is None:
            return
        try:
            await self._send(self._core.abort(), self._settings.command_timeout)
        except BaseException:
            self._failed = True
            raise

    async def close(self) -> None:
        await self._remove_spill()
        if self._closed:
            return
        self._closed = True
        try:
            if not self._failed and self._core.negotiated and not self._core.awaiting_reply:
                with contextlib.suppress(OSError, TimeoutError):
                    await self._send(self._core.quit(), self._settings.command_timeout)
        finally:
            self._writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self._settings.command_timeout):
                    await self._writer.wait_closed()

    async def _remove_spill(self) -> None:
        paths, self._spill[:] = list(self._spill), []
        if paths:
            loop = asyncio.get_running_loop()
            for path in paths:
                await loop.run_in_executor(None, _unlink, path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class _BodyCollector:
    """A replaced body: in memory while small, then spilled to a file beside
    the spooled message (so it is never held whole in memory)."""

    def __init__(self, directory: Path, spill: list[Path]) -> None:
        self._directory = directory
        self._spill = spill
        self._memory = bytearray()
        self._fd: int | None = None
        self._path: Path | None = None
        self.used = False

    async def add(self, chunk: bytes) -> None:
        self.used = True
        loop = asyncio.get_running_loop()
        if self._fd is None:
            self._memory += chunk
            if len(self._memory) <= _REPLBODY_IN_MEMORY:
                return
            fd, name = await loop.run_in_executor(
                None, lambda: tempfile.mkstemp(prefix="milter-body-", dir=self._directory)
            )
            self._fd, self._path = fd, Path(name)
            self._spill.append(self._path)
            chunk, self._memory = bytes(self._memory), bytearray()
        fd = self._fd
        await loop.run_in_executor(None, _write_all, fd, chunk)

    async def finish(self) -> bytes | Path:
        if self._fd is None:
            return bytes(self._memory)
        fd, self._fd = self._fd, None
        await asyncio.get_running_loop().run_in_executor(None, os.close, fd)
        assert self._path is not None
        return self._path

    async def discard(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await asyncio.get_running_loop().run_in_executor(None, os.close, fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
