"""Property-based fuzzing of the POP3 core's states (RFC 1939 §3-§6, RFC 2595 §4).

tests/unit/protocol/test_pop3.py checks that arbitrary bytes never break the
parser and that the message encoder round-trips.  Here random sessions —
real commands, hostile arguments, SASL exchanges, STLS, garbage — are
answered by a session that accepts or refuses logins at random, and the
core must keep the gate: no mailbox command before a successful login,
PASS only right after an accepted USER, nothing pipelined behind an
accepted STLS, a fresh AUTHORIZATION state after the handshake, and only
well-formed status lines on the wire.  The number of examples comes from
``POSTOFFICE_FUZZ_EXAMPLES`` (see README, "Test groups").
"""

from __future__ import annotations

import os
import re

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice.protocol.pop3 import (
    NEED_DATA,
    Auth,
    AuthResponse,
    BadCommand,
    Capa,
    Dele,
    List,
    Noop,
    Pass,
    Pop3Server,
    Pop3State,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
)

EXAMPLES = int(os.environ.get("POSTOFFICE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MAILBOX_COMMANDS = (Stat, List, Uidl, Retr, Top, Dele, Rset, Noop)

_ARG = st.one_of(
    st.sampled_from(["", "1", "0", "-1", "99999999999999999999", "a", " ", "\x00", "\t", "=",
                     "alice@example.test", "x" * 300, "1 2", "\u00e9"]),
    st.from_regex(r"[A-Za-z0-9=+/ ]{0,12}", fullmatch=True),
)  # fmt: skip
_VERBS = st.sampled_from(["USER", "PASS", "APOP", "AUTH", "AUTH PLAIN", "AUTH LOGIN", "STLS",
                          "CAPA", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP",
                          "QUIT", "user", "Retr", "XTND", "*", ""])  # fmt: skip
_ENDS = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])


@st.composite
def sessions(draw: st.DrawFn) -> list[bytes]:
    """Pieces of input, as they would arrive in separate reads."""
    pieces = []
    for _ in range(draw(st.integers(0, 20))):
        kind = draw(st.integers(0, 7))
        if kind == 0:
            pieces.append(draw(st.binary(max_size=30)))
        elif kind == 1:  # a login, then a mailbox command
            pieces.append(b"USER alice\r\nPASS secret word\r\n")
            pieces.append(draw(st.sampled_from([b"STAT", b"LIST", b"RETR 1", b"DELE 1"])) + b"\r\n")
        else:
            line = draw(_VERBS) + (" " + draw(_ARG) if draw(st.booleans()) else "")
            pieces.append(line.encode("utf-8") + draw(_ENDS))
        if draw(st.booleans()) and len(pieces) > 1:  # pipelined with the previous one
            pieces[-2:] = [pieces[-2] + pieces[-1]]
    return pieces


STATUS = re.compile(rb"(?:\+OK|-ERR|\+)(?: [^\r\n]*)?\r\n")


@FUZZ
@given(pieces=sessions(), choices=st.lists(st.booleans(), min_size=1, max_size=32))
def test_the_login_gate_holds_whatever_the_client_sends(
    pieces: list[bytes], choices: list[bool]
) -> None:
    core = Pop3Server(max_line=200)
    logged_in = False
    user_accepted = False
    output = bytearray()
    steps = 0
    for piece in pieces:
        core.receive_data(piece)
        for _ in range(100):
            event = core.next_event()
            if event is NEED_DATA:
                break
            accept = choices[steps % len(choices)]
            steps += 1
            if isinstance(event, MAILBOX_COMMANDS) and not isinstance(event, Noop):
                assert logged_in, f"{event!r} before a successful login"
                hypothesis.event("a mailbox command after a login")
            match event:
                case BadCommand():
                    output += core.reply_err("bad")
                case User():
                    assert not logged_in
                    output += core.reply_ok() if accept else core.reply_err("no")
                    user_accepted = accept
                case Pass():
                    assert user_accepted and not logged_in, "PASS without an accepted USER"
                    output += core.reply_ok() if accept else core.reply_err("no")
                    logged_in, user_accepted = accept, False
                case Auth(mechanism=None):
                    output += core.multiline("SASL", ["PLAIN"])
                case AuthResponse(data="*"):  # the client cancels (RFC 5034 §4)
                    assert not logged_in
                    output += core.reply_err("cancelled")
                    user_accepted = False
                case Auth() | AuthResponse():
                    assert not logged_in
                    if accept and isinstance(event, Auth) and event.initial is None:
                        output += core.continuation("")
                    elif accept:
                        output += core.reply_ok()
                        logged_in = True
                    else:
                        output += core.reply_err("no")
                    user_accepted = False
                case Stls():
                    assert not logged_in
                    if accept and not core.has_buffered_data:
                        output += core.reply_ok()
                        assert core.state is Pop3State.TLS_PENDING
                        core.receive_data(b"STAT\r\n")  # plaintext racing the handshake
                        core.tls_established()
                        assert core.state is Pop3State.AUTHORIZATION
                        user_accepted = False  # RFC 2595 §4: forget everything before
                    else:
                        output += core.reply_err("no")
                case Capa():
                    output += core.multiline("Capability list follows", ["USER", ".dotted"])
                case Quit():
                    output += core.reply_ok()
                case _:
                    output += core.reply_ok() if accept else core.reply_err("no")
            if core.state is Pop3State.CLOSED:
                break
        else:
            raise AssertionError("too many events from one piece")
        if core.state is Pop3State.CLOSED:
            break
    # Only status lines, continuations and multi-line bodies ending in "."
    text = bytes(output)
    text = re.sub(rb"\+OK [^\r\n]*\r\n(?:(?!\.\r\n)[^\r\n]*\r\n)*?\.\r\n", b"", text)
    assert b"".join(STATUS.findall(text)) == text, text[:200]
