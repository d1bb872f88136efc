"""Listener taking turns with other smtp processes (``shares``): the limits
that keep a client from waiting on a peer process that does not accept."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postoffice.config.settings import ListenAddress
from postoffice.net.accept import MAX_DEFER_SECONDS, AcceptShares
from postoffice.net.connection import Connection
from postoffice.net.listener import Listener


async def greet(conn: Connection) -> None:
    conn.write(b"220 hello\r\n")
    await conn.drain()
    await asyncio.sleep(30)  # held open: each client counts as a connection


def turns_listener(shares: AcceptShares) -> Listener:
    return Listener(
        name="smtp",
        addresses=(ListenAddress("127.0.0.1", 0),),
        handler=greet,
        busy_reply=b"421 busy\r\n",
        max_connections=100,
        max_per_ip=100,
        shares=shares,
    )


async def greeted(port: int, writers: list[asyncio.StreamWriter]) -> bytes:
    """Connect, keep the connection (in ``writers``), return the first line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writers.append(writer)
    return await asyncio.wait_for(reader.readline(), 5)


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
        await writer.wait_closed()


def test_a_peer_that_never_accepts_delays_clients_only_briefly(tmp_path: Path) -> None:
    shares = AcceptShares.create(tmp_path, 2, 1000)
    stuck = AcceptShares.open(tmp_path, 1)
    stuck.accepting(True)  # says it takes connections, holds none, never accepts

    async def run() -> tuple[list[bytes], float, dict[int, int]]:
        lst = turns_listener(shares)
        await lst.start()
        port = lst.bound[0][1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        writers: list[asyncio.StreamWriter] = []
        lines = [await greeted(port, writers) for _ in range(4)]
        waited = loop.time() - started
        await close_all(writers)
        lst.stop_accepting()
        await lst.finish(1.0)
        return lines, waited, {0: shares.held}

    try:
        lines, waited, counts = asyncio.run(run())
    finally:
        shares.close()
        stuck.close()
    assert lines == [b"220 hello\r\n"] * 4  # accepted although it was never its turn
    assert counts == {0: 0}  # every accepted connection released again
    # At most MAX_DEFER_SECONDS per client past the slack (generous for slow CI).
    assert waited < 4 * MAX_DEFER_SECONDS + 5


def test_a_listener_alone_in_the_sharing_accepts_at_once(tmp_path: Path) -> None:
    shares = AcceptShares.create(tmp_path, 2, 1000)  # slot 1 never joins: not waited for

    async def run() -> list[bytes]:
        lst = turns_listener(shares)
        await lst.start()
        port = lst.bound[0][1]
        writers: list[asyncio.StreamWriter] = []
        lines = [await greeted(port, writers) for _ in range(5)]
        assert shares.held == 5
        await close_all(writers)
        lst.stop_accepting()
        await lst.finish(1.0)
        return lines

    try:
        assert asyncio.run(run()) == [b"220 hello\r\n"] * 5
    finally:
        shares.close()
