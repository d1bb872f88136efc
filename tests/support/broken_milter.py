"""A deliberately broken milter, run as its own process by the tests.

``python broken_milter.py MODE`` listens on 127.0.0.1 (a free port, printed
on the first line of stdout; ``MODE PATH`` listens on a unix socket), negotiates like a real milter, answers
``continue`` to everything, and misbehaves at the body:

- ``hang``: never answers the first body chunk (nor anything after);
- ``garbage``: answers the first body chunk with bytes that are no packet;
- ``close``: closes the connection mid-body;
- ``huge``: announces a 2 GiB packet;
- ``good``: behaves, and at end of message adds ``X-Broken-Milter: no``.

It exits by itself after 60 seconds, so a test that forgets it leaks
nothing for long.
"""

from __future__ import annotations

import asyncio
import struct
import sys


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


async def serve(mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(10000):
            head = await reader.readexactly(4)
            (length,) = struct.unpack("!I", head)
            body = await reader.readexactly(length)
            cmd = body[:1]
            if cmd == b"O":
                # version 6, add headers only, all stages with replies
                writer.write(packet(b"O", struct.pack("!III", 6, 0x01, 0)))
            elif cmd in (b"D", b"A"):
                continue  # macros and abort get no answer
            elif cmd == b"Q":
                break
            elif cmd == b"B" and mode != "good":
                if mode == "hang":
                    await asyncio.sleep(3600)
                elif mode == "garbage":
                    writer.write(b"\x00\x00\x00\x05zzzzGARBAGE\r\n")
                elif mode == "huge":
                    writer.write(struct.pack("!I", 0x7FFFFFFF) + b"h")
                await writer.drain()
                break
            elif cmd == b"E":
                writer.write(packet(b"h", b"X-Broken-Milter\x00no\x00") + packet(b"c"))
            else:
                writer.write(packet(b"c"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(mode: str, unix_path: str | None) -> None:
    if unix_path:
        server = await asyncio.start_unix_server(lambda r, w: serve(mode, r, w), unix_path)
        print(unix_path, flush=True)
    else:
        server = await asyncio.start_server(lambda r, w: serve(mode, r, w), "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.sleep(60)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
