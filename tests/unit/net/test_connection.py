"""Connection: the ``on_data`` fast path and moving a read's deadline."""

from __future__ import annotations

import asyncio

import pytest

from postoffice.net.connection import Connection


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def test_input_taken_by_on_data_does_not_end_the_read() -> None:
    async def main() -> None:
        conn = Connection()
        conn.connection_made(FakeTransport())
        offered: list[bytes] = []

        def on_data(data: bytes) -> bool:
            offered.append(data)
            return data == b"mine\r\n"

        conn.on_data = on_data
        read = asyncio.ensure_future(conn.read(None))
        await asyncio.sleep(0)
        conn.data_received(b"mine\r\n")
        await asyncio.sleep(0)
        assert not read.done()
        conn.data_received(b"yours\r\n")
        assert await read == b"yours\r\n"
        # Not waiting in read(): input is buffered, not offered.
        conn.data_received(b"mine\r\n")
        assert offered == [b"mine\r\n", b"yours\r\n"]
        assert await conn.read(None) == b"mine\r\n"

    asyncio.run(main())


def test_on_data_is_not_offered_input_behind_buffered_input_or_at_shutdown() -> None:
    async def main() -> None:
        conn = Connection()
        conn.connection_made(FakeTransport())
        offered: list[bytes] = []
        conn.on_data = lambda data: offered.append(data) is None
        read = asyncio.ensure_future(conn.read(None))
        await asyncio.sleep(0)
        conn.request_shutdown()
        conn.data_received(b"late\r\n")
        assert await read == b"late\r\n"  # data first; the next read sees the shutdown
        assert offered == []

    asyncio.run(main())


def test_a_moved_deadline_keeps_the_read_waiting() -> None:
    async def main() -> None:
        conn = Connection()
        conn.connection_made(FakeTransport())

        def on_data(data: bytes) -> bool:
            conn.move_read_deadline(conn.time() + 30)
            return True

        conn.on_data = on_data
        read = asyncio.ensure_future(conn.read(0.2))
        await asyncio.sleep(0)
        conn.data_received(b"x\r\n")
        await asyncio.sleep(0.6)  # well past the first deadline
        assert not read.done()
        conn.on_data = None
        conn.data_received(b"y\r\n")
        assert await read == b"y\r\n"

    asyncio.run(main())


def test_a_read_still_times_out_without_input() -> None:
    async def main() -> None:
        conn = Connection()
        conn.connection_made(FakeTransport())
        conn.on_data = lambda data: True
        with pytest.raises(TimeoutError):
            await conn.read(0.05)

    asyncio.run(main())
