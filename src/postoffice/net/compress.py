"""COMPRESS=DEFLATE (RFC 4978): raw DEFLATE both ways, for a Connection.

After the OK to ``COMPRESS DEFLATE`` everything on the connection, both
ways, is one raw DEFLATE stream per direction (RFC 1951, no zlib header:
``wbits=-15``, RFC 4978 §3).  Inside TLS the stream is what TLS carries.

Output is compressed in one call per ``Connection.write`` (a session writes
what it gathered, up to a whole FETCH batch, at once) and ends with a sync
flush, so the client can inflate every response we sent without waiting
for more (RFC 4978 §4 asks for a flush at the end of each response).

Input is attacker-controlled and DEFLATE expands up to about 1032:1: a few
KiB could become megabytes.  ``inflate`` therefore never produces more than
``INFLATE_CHUNK`` octets per call (``max_length``; what it did not reach
waits in ``unconsumed_tail``), the same as ``MAX_LINE``: the IMAP core then
sees the plaintext in pieces no bigger than one line and applies its line,
command and literal limits as it does to uncompressed input.  The CPU per
call is bounded by the same figure: zlib stops when the output is full.
"""

from __future__ import annotations

import zlib

from postoffice.protocol.imap import MAX_LINE

INFLATE_CHUNK = MAX_LINE  # most plaintext octets one inflate call yields
# Compression runs on the event loop, so speed matters more than the last
# few percent: on a 256 KiB FETCH write (text plus a base64 attachment)
# level 1 takes 4.8 ms and level 6 (zlib's and Dovecot's default) 6.9 ms,
# for ratios of 1.38 and 1.42; on plain text 17.6 against 18.5.
LEVEL = 1
WBITS = -15  # raw DEFLATE, no zlib header or trailer (RFC 4978 §3)


class InflateError(Exception):
    """The peer's compressed stream is invalid (or ended): the session ends."""


class Deflate:
    """The two DEFLATE streams of one connection and their octet counts."""

    def __init__(self, level: int = LEVEL) -> None:
        self._out = zlib.compressobj(level, zlib.DEFLATED, WBITS)
        self._in = zlib.decompressobj(WBITS)
        self._full = False  # the last inflate filled INFLATE_CHUNK: zlib may hold more
        self.plain_in = self.raw_in = self.plain_out = self.raw_out = 0

    def compress(self, data: bytes) -> bytes:
        """``data`` compressed and sync-flushed: the client can read all of it."""
        out = self._out.compress(data) + self._out.flush(zlib.Z_SYNC_FLUSH)
        self.plain_out += len(data)
        self.raw_out += len(out)
        return out

    @property
    def pending(self) -> bool:
        """Input already given may yield more plaintext: call ``inflate(b"")``."""
        return self._full or bool(self._in.unconsumed_tail)

    def inflate(self, data: bytes) -> bytes:
        """Plaintext from what is pending, then ``data``: at most INFLATE_CHUNK
        octets (possibly none: a block may need more input).  Give ``data``
        only when nothing is ``pending``; raise InflateError on a bad stream."""
        d = self._in
        tail = d.unconsumed_tail
        if tail:
            assert not data, "new input while the old is not inflated"
            data = tail
        self.raw_in += len(data) - len(tail)
        try:
            out = d.decompress(data, INFLATE_CHUNK)
        except zlib.error as exc:
            raise InflateError(f"invalid compressed data: {exc}") from None
        if d.eof:
            # A final block: RFC 4978 has no way to end compression, so
            # what came after it (unused_data) could never be read.
            raise InflateError("the compressed stream ended")
        self._full = len(out) == INFLATE_CHUNK
        self.plain_in += len(out)
        return out
