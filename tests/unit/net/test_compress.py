"""COMPRESS=DEFLATE (RFC 4978): ``net/compress.Deflate`` and ``Connection.start_deflate``.

zlib on the client side, as a real client does it: every write the server
makes can be inflated at once (sync flush); input inflates in pieces of at
most INFLATE_CHUNK however well it compresses (a deflate bomb); a bad or
ended stream raises InflateError; bytes received before ``start_deflate``
are inflated first.
"""

from __future__ import annotations

import asyncio
import zlib

import pytest

from postoffice.net.compress import INFLATE_CHUNK, Deflate, InflateError
from postoffice.net.connection import Connection, ConnectionClosed
from tests.unit.net.test_connection import FakeTransport


def client_deflater() -> zlib._Compress:
    return zlib.compressobj(6, zlib.DEFLATED, -15)


def deflate(data: bytes, final: bool = False) -> bytes:
    d = client_deflater()
    return d.compress(data) + d.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


def test_each_write_inflates_on_its_own_and_is_counted() -> None:
    server, client = Deflate(), zlib.decompressobj(-15)
    for chunk in (b"* OK hello\r\n", b"A OK done\r\n" * 1000, b"B OK\r\n"):
        out = server.compress(chunk)
        assert out.endswith(b"\x00\x00\xff\xff")  # the sync flush's empty block
        assert client.decompress(out) == chunk  # nothing held back
    assert server.plain_out == 12 + 11000 + 6
    assert server.raw_out < server.plain_out


def test_input_inflates_across_arbitrary_splits() -> None:
    wire = deflate(b"A NOOP\r\nB SELECT INBOX\r\n")
    server = Deflate()
    got = b"".join(server.inflate(wire[i : i + 1]) for i in range(len(wire)))
    assert got == b"A NOOP\r\nB SELECT INBOX\r\n"
    assert server.raw_in == len(wire) and server.plain_in == len(got)


def test_a_deflate_bomb_comes_out_in_bounded_pieces() -> None:
    bomb = deflate(b"\0" * (64 << 20))  # 64 MiB of zeros: about 64 KiB on the wire
    assert len(bomb) < 100_000
    server = Deflate()
    pieces = [server.inflate(bomb)]
    while server.pending:
        pieces.append(server.inflate(b""))
    assert max(map(len, pieces)) == INFLATE_CHUNK
    assert sum(map(len, pieces)) == 64 << 20


def test_plaintext_zlib_holds_after_a_full_chunk_is_not_lost() -> None:
    # A run of zeros is a few long matches; cut the input right after one:
    # the output fills INFLATE_CHUNK mid-match with all input consumed
    # (no unconsumed_tail), and zlib still holds the rest of the match.
    data = b"\0" * (INFLATE_CHUNK + 1000)
    wire = deflate(data)
    for cut in range(1, len(wire)):
        server = Deflate()
        got = server.inflate(wire[:cut])
        if len(got) == INFLATE_CHUNK:
            break
    else:
        raise AssertionError("no cut fills the chunk")
    # Without more input (the client waits for our answer) it must come out.
    assert server.pending
    while server.pending:
        got += server.inflate(b"")
    assert len(got) > INFLATE_CHUNK
    got += server.inflate(wire[cut:])
    while server.pending:
        got += server.inflate(b"")
    assert got == data


@pytest.mark.parametrize(
    "wire",
    [b"\xff\xff\xff\xff not deflate", deflate(b"A LOGOUT\r\n", final=True) + b"more"],
    ids=["garbage", "ended-stream"],
)
def test_a_bad_or_ended_stream_raises(wire: bytes) -> None:
    with pytest.raises(InflateError):
        Deflate().inflate(wire)


def test_connection_inflates_what_the_session_held_back_then_what_it_has() -> None:
    async def main() -> None:
        conn = Connection()
        transport = FakeTransport()
        conn.connection_made(transport)
        d = client_deflater()
        first = d.compress(b"B NOOP\r\n") + d.flush(zlib.Z_SYNC_FLUSH)
        second = d.compress(b"C NOOP\r\n") + d.flush(zlib.Z_SYNC_FLUSH)
        conn.data_received(second)  # unread in the connection
        conn.start_deflate(first)  # read by the session, not parsed
        assert await conn.read(1) == b"B NOOP\r\nC NOOP\r\n"
        conn.write(b"B OK NOOP completed\r\n")
        assert zlib.decompressobj(-15).decompress(transport.written[-1]) == (
            b"B OK NOOP completed\r\n"
        )
        with pytest.raises(RuntimeError):
            conn.start_deflate()

    asyncio.run(main())


def test_connection_reads_a_bomb_in_pieces_and_all_of_it_before_eof() -> None:
    async def main() -> None:
        conn = Connection()
        conn.connection_made(FakeTransport())
        conn.start_deflate()
        conn.data_received(deflate(b"x" * (INFLATE_CHUNK * 4 + 5)))
        conn.eof_received()
        sizes = [len(await conn.read(1)) for _ in range(5)]
        assert sizes == [INFLATE_CHUNK] * 4 + [5]
        with pytest.raises(ConnectionClosed):
            await conn.read(1)

    asyncio.run(main())


def test_connection_waits_for_the_rest_of_a_block() -> None:
    async def main() -> None:
        conn = Connection()
        conn.connection_made(FakeTransport())
        conn.start_deflate()
        wire = deflate(b"A NOOP\r\n")
        conn.data_received(wire[:1])  # no plaintext yet: read() goes on waiting
        read = asyncio.ensure_future(conn.read(1))
        await asyncio.sleep(0.01)
        assert not read.done()
        conn.data_received(wire[1:])
        assert await read == b"A NOOP\r\n"

    asyncio.run(main())
