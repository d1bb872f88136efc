"""The milter core as transcripts: our packets out, a milter's packets in (mfdef.h)."""

from __future__ import annotations

import struct

import pytest

from postoffice.protocol import milter as m
from postoffice.protocol.errors import LocalProtocolError, RemoteProtocolError


def pkt(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def optneg_reply(
    actions: int = m.ALL_ACTIONS,
    protocol: int = 0,
    macros: dict[int, str] | None = None,
    version: int = 6,
) -> bytes:
    data = struct.pack("!III", version, actions, protocol)
    for stage, names in (macros or {}).items():
        data += struct.pack("!I", stage) + names.encode() + b"\0"
    return pkt(b"O", data)


def feed(client: m.MilterClient, data: bytes) -> list[m.Event]:
    client.receive_data(data)
    events: list[m.Event] = []
    for _ in range(100):
        event = client.next_event()
        if event is None:
            return events
        events.append(event)
    raise AssertionError("unbounded events")


def negotiated(**kw: object) -> m.MilterClient:
    client = m.MilterClient()
    client.start()
    (event,) = feed(client, optneg_reply(**kw))  # type: ignore[arg-type]
    assert isinstance(event, m.Negotiated)
    return client


def test_optneg_offers_version_6_all_actions_and_no_rcpt_rej() -> None:
    client = m.MilterClient()
    out = client.start()
    assert out[:5] == struct.pack("!I", 13) + b"O"
    version, actions, protocol = struct.unpack("!III", out[5:])
    assert (version, actions) == (6, m.ALL_ACTIONS)
    assert protocol & m.SMFIP_HDR_LEADSPC and protocol & m.SMFIP_SKIP
    assert not protocol & m.SMFIP_RCPT_REJ
    assert client.awaiting_reply


def test_optneg_reply_with_macro_lists() -> None:
    client = m.MilterClient()
    client.start()
    reply = optneg_reply(
        protocol=m.SMFIP_NR_HELO | m.SMFIP_SKIP,
        macros={m.SMFIM_CONNECT: "{client_addr} j _", m.SMFIM_ENVFROM: "i {auth_authen}"},
    )
    # split across reads: the core waits for the whole packet
    assert feed(client, reply[:7]) == []
    (event,) = feed(client, reply[7:])
    assert event == m.Negotiated(
        6,
        m.ALL_ACTIONS,
        m.SMFIP_NR_HELO | m.SMFIP_SKIP,
        {m.SMFIM_CONNECT: ("{client_addr}", "j", "_"), m.SMFIM_ENVFROM: ("i", "{auth_authen}")},
    )
    assert not client.awaiting_reply


def test_connect_sends_only_requested_macros_then_command() -> None:
    client = negotiated(macros={m.SMFIM_CONNECT: "{client_addr} j"})
    out = client.connect(
        "mx.example",
        "4",
        2525,
        "192.0.2.1",
        {"client_addr": "192.0.2.1", "j": "po.test", "{daemon_name}": "postoffice"},
    )
    macro = pkt(b"D", b"C{client_addr}\x00192.0.2.1\x00j\x00po.test\x00")
    command = pkt(b"C", b"mx.example\x004" + struct.pack("!H", 2525) + b"192.0.2.1\x00")
    assert out == macro + command
    assert client.awaiting_reply
    assert feed(client, pkt(b"c")) == [m.Continue()]


def test_stage_without_macro_list_gets_every_macro() -> None:
    client = negotiated()
    out = client.helo("client.example", {"{tls_version}": "TLSv1.3"})
    assert out == pkt(b"D", b"H{tls_version}\x00TLSv1.3\x00") + pkt(b"H", b"client.example\x00")


def test_unknown_family_sends_no_port_or_address() -> None:
    client = negotiated()
    assert client.connect("unknown", "U", 0, "") == pkt(b"C", b"unknown\x00U")


def test_no_reply_and_skipped_stages() -> None:
    client = negotiated(protocol=m.SMFIP_NR_HELO | m.SMFIP_NOMAIL | m.SMFIP_NR_HDR)
    assert client.helo("x") == pkt(b"H", b"x\x00")
    assert not client.awaiting_reply
    assert client.mail(["<a@b>"]) == b""
    assert not client.wants(m.SMFIC_MAIL)
    assert client.rcpt(["<c@d>", "NOTIFY=NEVER"]) == pkt(b"R", b"<c@d>\x00NOTIFY=NEVER\x00")
    assert feed(client, pkt(b"c")) == [m.Continue()]
    client.header("Subject", " hi")
    assert not client.awaiting_reply


def test_header_leading_space_only_when_negotiated() -> None:
    plain = negotiated()
    assert plain.header("Subject", " hello") == pkt(b"L", b"Subject\x00hello\x00")
    lead = negotiated(protocol=m.SMFIP_HDR_LEADSPC)
    assert lead.header("Subject", " hello") == pkt(b"L", b"Subject\x00 hello\x00")


def test_eom_modifications_then_final() -> None:
    client = negotiated()
    client.eom()
    events = feed(
        client,
        pkt(b"h", b"X-Spam\x00Yes\x00")
        + pkt(b"i", struct.pack("!I", 0) + b"X-First\x00one\x00")
        + pkt(b"m", struct.pack("!I", 1) + b"Subject\x00new\x00")
        + pkt(b"m", struct.pack("!I", 2) + b"Received\x00\x00")
        + pkt(b"+", b"<x@y>\x00")
        + pkt(b"2", b"<p@q>\x00NOTIFY=NEVER\x00")
        + pkt(b"-", b"<old@y>\x00")
        + pkt(b"e", b"<new@s>\x00")
        + pkt(b"b", b"new body\r\n")
        + pkt(b"q", b"held\x00")
        + pkt(b"p")
        + pkt(b"a"),
    )
    assert events == [
        m.AddHeader("X-Spam", " Yes"),
        m.InsertHeader(0, "X-First", " one"),
        m.ChangeHeader(1, "Subject", " new"),
        m.ChangeHeader(2, "Received", None),
        m.AddRecipient("<x@y>"),
        m.AddRecipient("<p@q>", "NOTIFY=NEVER"),
        m.DeleteRecipient("<old@y>"),
        m.ChangeSender("<new@s>"),
        m.ReplaceBody(b"new body\r\n"),
        m.Quarantine("held"),
        m.Progress(),
        m.Accept(),
    ]
    assert not client.awaiting_reply


@pytest.mark.parametrize(
    ("cmd", "event"),
    [
        (b"c", m.Continue()),
        (b"a", m.Accept()),
        (b"r", m.Reject()),
        (b"t", m.Tempfail()),
        (b"d", m.Discard()),
        (b"4", m.Shutdown()),
        (b"f", m.Shutdown()),
    ],
)
def test_final_responses(cmd: bytes, event: m.Event) -> None:
    client = negotiated()
    client.mail(["<a@b>"])
    assert feed(client, pkt(cmd)) == [event]


def test_replycode_with_enhanced_code_and_lines() -> None:
    client = negotiated()
    client.rcpt(["<a@b>"])
    (event,) = feed(client, pkt(b"y", b"550-5.7.1 Spam\r\n550 5.7.1 go away\x00"))
    assert event == m.ReplyCode(550, "5.7.1", ("Spam", "go away"))
    assert isinstance(event, m.ReplyCode) and event.permanent
    assert m.parse_reply_code("451 4.7.1 Try again later") == m.ReplyCode(
        451, "4.7.1", ("Try again later",)
    )
    assert m.parse_reply_code("554 no enhanced") == m.ReplyCode(554, None, ("no enhanced",))


@pytest.mark.parametrize("text", [b"250 ok\x00", b"55 short\x00", b"550-5.7.1 a\r\n551 b\x00"])
def test_bad_replycode_is_protocol_error(text: bytes) -> None:
    client = negotiated()
    client.mail(["<a@b>"])
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"y", text))


def test_body_chunks_and_skip() -> None:
    client = negotiated(protocol=m.SMFIP_SKIP)
    assert client.body(b"x" * m.BODY_CHUNK) == pkt(b"B", b"x" * m.BODY_CHUNK)
    with pytest.raises(LocalProtocolError):
        client.body(b"more")  # reply still awaited
    assert feed(client, pkt(b"s")) == [m.Skip()]
    assert client.skipped_body
    assert client.body(b"rest") == b""
    assert client.eom() == pkt(b"E")


def test_oversized_body_chunk_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        negotiated().body(b"x" * (m.BODY_CHUNK + 1))


def test_skip_without_negotiation_is_refused() -> None:
    client = negotiated()
    client.body(b"x")
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"s"))


def test_modification_outside_eom_or_not_negotiated() -> None:
    client = negotiated()
    client.rcpt(["<a@b>"])
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"h", b"X\x00y\x00"))
    limited = negotiated(actions=m.SMFIF_ADDHDRS)
    limited.eom()
    with pytest.raises(RemoteProtocolError):
        feed(limited, pkt(b"b", b"body"))


def test_oversized_length_refused_before_buffering() -> None:
    client = m.MilterClient(max_packet=1000)
    client.start()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(struct.pack("!I", 1001))
    zero = m.MilterClient()
    zero.start()
    with pytest.raises(RemoteProtocolError):
        zero.receive_data(b"\0\0\0\0")


@pytest.mark.parametrize(
    "reply",
    [
        pkt(b"c"),  # not an OPTNEG
        optneg_reply(version=7),
        optneg_reply(version=1),
        optneg_reply(actions=0x200),  # an action we did not offer
        optneg_reply(protocol=m.SMFIP_RCPT_REJ),
        pkt(b"O", b"short"),
        optneg_reply() + pkt(b"c"),  # unsolicited after the answer
        pkt(b"O", struct.pack("!III", 6, 0, 0) + struct.pack("!I", 9) + b"j\x00"),
        pkt(b"O", struct.pack("!III", 6, 0, 0) + struct.pack("!I", 0) + b"j"),
    ],
)
def test_bad_optneg(reply: bytes) -> None:
    client = m.MilterClient()
    client.start()
    with pytest.raises(RemoteProtocolError):
        feed(client, reply)


def test_unknown_unsolicited_and_trailing_data() -> None:
    client = negotiated()
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"c"))  # nothing was asked
    client = negotiated()
    client.mail(["<a@b>"])
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"Z"))
    client = negotiated()
    client.mail(["<a@b>"])
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"c", b"junk"))


def test_bad_header_name_from_milter() -> None:
    client = negotiated()
    client.eom()
    with pytest.raises(RemoteProtocolError):
        feed(client, pkt(b"h", b"Bad Name\x00v\x00"))


def test_sequence_errors_are_ours() -> None:
    client = m.MilterClient()
    with pytest.raises(LocalProtocolError):
        client.helo("x")
    client = negotiated()
    client.mail(["<a@b>"])
    with pytest.raises(LocalProtocolError):
        client.abort()


def test_abort_and_quit() -> None:
    client = negotiated()
    assert client.abort() == pkt(b"A")
    assert not client.awaiting_reply
    assert client.quit_nc() == pkt(b"K")
    assert client.negotiated is None
    client.start()
    feed(client, optneg_reply())
    assert client.quit() == pkt(b"Q")
    with pytest.raises(LocalProtocolError):
        client.quit()


def test_macro_names_match_with_or_without_braces() -> None:
    client = negotiated(macros={m.SMFIM_ENVFROM: "auth_authen {mail_addr}"})
    out = client.mail(["<a@b>"], {"{auth_authen}": "alice", "mail_addr": "a@b"})
    assert out.startswith(pkt(b"D", b"Mauth_authen\x00alice\x00{mail_addr}\x00a@b\x00"))
