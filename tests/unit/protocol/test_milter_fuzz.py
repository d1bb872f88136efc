"""Fuzzing the milter decoder: any bytes give events or RemoteProtocolError, never more."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol import milter as m
from postoffice.protocol.errors import RemoteProtocolError

RESPONSES = b"+-24abcdefhimpqrsty"


def _packet(cmd: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


packets = st.builds(
    _packet,
    st.sampled_from([bytes([c]) for c in RESPONSES] + [b"O", b"Z"]),
    st.binary(max_size=64),
)


def _drive(client: m.MilterClient, data: bytes, split: int) -> None:
    try:
        for piece in (data[:split], data[split:]):
            client.receive_data(piece)
            for _ in range(len(data) + 1):
                if client.next_event() is None:
                    break
    except RemoteProtocolError:
        pass
    # bounded: nothing beyond max_packet (+ one header) is ever kept
    assert len(client._buffer) <= client._max_packet + 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_raw_bytes_after_optneg(data: bytes, split: int) -> None:
    client = m.MilterClient(max_packet=200)
    client.start()
    _drive(client, data, split)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(packets, max_size=8),
    st.sampled_from(["mail", "body", "eom"]),
    st.integers(min_value=0, max_value=600),
)
def test_structured_packets_at_each_stage(replies: list[bytes], stage: str, split: int) -> None:
    client = m.MilterClient()
    client.start()
    client.receive_data(_packet(b"O", struct.pack("!III", 6, m.ALL_ACTIONS, m.SMFIP_SKIP)))
    assert isinstance(client.next_event(), m.Negotiated)
    if stage == "mail":
        client.mail(["<a@b>"])
    elif stage == "body":
        client.body(b"x")
    else:
        client.eom()
    _drive(client, b"".join(replies), split)
