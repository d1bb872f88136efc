"""Shared pieces of the milter tests: a spooled message, session facts, a
broken-milter process, and one whole SMTP transaction through a chain."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from postoffice.config.settings import MilterSettings
from postoffice.filters.chain import FilterChain
from postoffice.filters.interface import SessionFacts, SpooledMessage
from postoffice.filters.milter import MilterFilter
from postoffice.filters.verdicts import FilterResult

BROKEN = Path(__file__).resolve().parents[2] / "support" / "broken_milter.py"

FACTS = SessionFacts(
    client_address="127.0.0.1",
    client_port=40000,
    client_name="client.example.test",
    hostname="mx.example.test",
    listener="smtp",
    helo="client.example.test",
    queue_id="Q123ABC",
    sender="sender@example.test",
)


def spool(
    tmp: Path, headers: list[tuple[str, str]], body: bytes, rcpts: tuple[str, ...] = ()
) -> SpooledMessage:
    """The message as the server stores it: LF line ends, folded values kept."""
    head = "".join(f"{n}: {v}\n" for n, v in headers).encode()
    path = tmp / "spooled.eml"
    path.write_bytes(head + b"\n" + body)
    return SpooledMessage(
        path=path,
        headers=tuple(headers),
        body_offset=len(head) + 1,
        size=len(head) + 1 + len(body),
        sender=FACTS.sender,
        recipients=rcpts or ("rcpt@example.test",),
    )


@contextmanager
def broken_milter(mode: str, unix_path: Path | None = None) -> Iterator[str]:
    """Start tests/support/broken_milter.py; yield its config address."""
    args = [sys.executable, str(BROKEN), mode] + ([str(unix_path)] if unix_path else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first, "broken milter did not start"
        yield f"unix:{first}" if unix_path else f"inet:127.0.0.1:{first}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def settings(address: str, action: str = "tempfail", timeout: float = 5.0) -> MilterSettings:
    return MilterSettings(
        address=address,
        default_action=action,
        connect_timeout=timeout,
        command_timeout=timeout,
        eom_timeout=timeout,
    )


async def transaction(
    address: str | MilterSettings, message: SpooledMessage, *, helo: str = "client.example.test"
) -> list[FilterResult]:
    """connect, helo, mail, rcpt..., message through a one-milter chain."""
    conf = settings(address) if isinstance(address, str) else address
    chain = FilterChain([MilterFilter(conf)])
    session = await chain.open(FACTS)
    try:
        results = [await session.connect(FACTS), await session.helo(FACTS, helo)]
        results.append(await session.mail(FACTS, message.sender, ""))
        for rcpt in message.recipients:
            results.append(await session.rcpt(FACTS, rcpt, ""))
        results.append(await session.message(FACTS, message))
        return results
    finally:
        await session.close()
