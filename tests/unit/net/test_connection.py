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


def test_a_write_the_peer_never_takes_gives_up_after_write_timeout() -> None:
    """drain() waits for a peer that reads nothing at most ``write_timeout``,
    then aborts the connection (a close would wait on the same full buffer)."""
    import socket

    from postoffice.net.connection import WriteTimeout

    async def main() -> tuple[type[BaseException] | None, bool, float]:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[Connection] = loop.create_future()

        def factory() -> Connection:
            conn = Connection()
            conn.write_timeout = 0.3
            loop.call_soon(made.set_result, conn)
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", port))  # and never reads
        try:
            conn = await made
            started = loop.time()
            raised: type[BaseException] | None = None
            for _ in range(1000):  # 64 MiB at most: the buffers fill long before
                conn.write(b"x" * 65536)
                try:
                    await asyncio.wait_for(conn.drain(), 10)
                except (WriteTimeout, TimeoutError) as exc:
                    raised = type(exc)
                    break
            waited = loop.time() - started
            await asyncio.sleep(0.05)
            closed = conn.transport is None or conn.transport.is_closing()
        finally:
            peer.close()
            server.close()
        return raised, closed, waited

    raised, closed, waited = asyncio.run(main())
    assert raised is WriteTimeout  # not wait_for's TimeoutError: drain gave up by itself
    assert closed
    assert waited < 10
