"""Property-based fuzzing of the IMAP core (issue #13: bounded parser).

Random bytes, in random pieces, in every state never raise out of the core
and always come out as events the session can answer; generated commands
encoded the way a client would (atoms, quoted strings, synchronizing and
non-synchronizing literals) parse back to the same event; mailbox names
round-trip through modified UTF-7.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice.mail import mutf7
from postoffice.protocol import imap_events as ev
from postoffice.protocol.imap import ImapServerCore, ImapState
from postoffice.protocol.imap_response import encode_string

EXAMPLES = int(os.environ.get("POSTOFFICE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_WORDS = [b"a1 ", b"LOGIN ", b"SELECT ", b"FETCH ", b"UID ", b"SEARCH ", b"APPEND ", b"IDLE",
          b"DONE", b"AUTHENTICATE PLAIN", b"STARTTLS", b"(", b")", b"[", b"]", b"<0.5>", b'"',
          b"\\", b"{3}\r\n", b"{2+}\r\n", b"{99999999999}\r\n", b"~{1}\r\n", b"\r\n", b"\n",
          b" ", b"*", b"$", b"1:*", b"NOT ", b"OR ", b"BODY.PEEK[HEADER.FIELDS (A)]", b"\x00",
          b"\xff", b"INBOX", b"&AOk-", b"&"]  # fmt: skip
_CHUNK = st.one_of(st.binary(max_size=40), st.sampled_from(_WORDS))


def _drive(core: ImapServerCore, pieces: list[bytes]) -> None:
    for piece in pieces:
        core.receive_data(piece)
        for _ in range(1000):
            event = core.next_event()
            if event is None:
                break
            _answer(core, event)
            assert core.buffered <= core.max_line + core.max_command + core.max_append


def _answer(core: ImapServerCore, event: ev.Event) -> None:
    match event:
        case ev.Rejected():
            out = core.reply_rejected()
        case ev.LiteralExpected():
            out = core.continue_literal()
        case ev.Idle() | ev.Authenticate():
            out = core.continuation("")
        case ev.StartTls():
            out = core.tagged("NO", "not now")
        case _:
            out = core.tagged("OK")
    assert out.endswith(b"\r\n")


@FUZZ
@given(
    st.sampled_from([ImapState.NOT_AUTHENTICATED, ImapState.AUTHENTICATED, ImapState.SELECTED]),
    st.lists(st.lists(_CHUNK, max_size=8).map(b"".join), max_size=12),
)
def test_random_bytes_never_raise(state: ImapState, pieces: list[bytes]) -> None:
    core = ImapServerCore(max_line=200, max_command=500, max_append=300)
    if state is not ImapState.NOT_AUTHENTICATED:
        core.greeting("hi", preauth=True)
    if state is ImapState.SELECTED:
        core.receive_data(b"s SELECT INBOX\r\n")
        core.next_event()
        core.tagged("OK")
    _drive(core, pieces)


# --- round trips -------------------------------------------------------------------

_TAG = st.from_regex(r"[A-Za-z0-9.]{1,8}", fullmatch=True)
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
_NAME = st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs", "Cc")), max_size=20)
_FLAG = st.sampled_from(["\\Seen", "\\Deleted", "\\Answered", "\\Flagged", "\\Draft", "$Junk"])
_NUMBER = st.integers(1, 2**32 - 1)


def _string(draw: st.DrawFn, text: str) -> bytes:
    """``text`` as a client might send it: quoted (when it can be) or a
    literal of either kind."""
    how = draw(st.sampled_from(["quoted", "sync", "plus"]))
    raw = text.encode()
    if how == "quoted" and not any(c in raw for c in b"\r\n\x00"):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    mark = b"+" if how == "plus" else b""
    return b"{%d%s}\r\n" % (len(raw), mark) + raw


@st.composite
def _login(draw: st.DrawFn) -> tuple[bytes, ev.Event]:
    tag, user, password = draw(_TAG), draw(_TEXT), draw(_TEXT)
    line = tag.encode() + b" LOGIN " + _string(draw, user) + b" " + _string(draw, password)
    return line, ev.Login(tag, user, password)


@st.composite
def _store(draw: st.DrawFn) -> tuple[bytes, ev.Event]:
    tag = draw(_TAG)
    ranges = tuple(draw(st.lists(st.tuples(_NUMBER, _NUMBER | st.none()), min_size=1, max_size=5)))
    seq = ev.SequenceSet(ranges)
    mode = draw(st.sampled_from(["", "+", "-"]))
    silent = draw(st.booleans())
    flags = tuple(draw(st.lists(_FLAG, max_size=4)))
    line = f"{tag} UID STORE {seq.to_wire()} {mode}FLAGS{'.SILENT' if silent else ''} ({' '.join(flags)})"
    return line.encode(), ev.Store(tag, True, seq, mode, silent, flags)


@st.composite
def _fetch(draw: st.DrawFn) -> tuple[bytes, ev.Event]:
    tag = draw(_TAG)
    seq = ev.SequenceSet(((draw(_NUMBER), None),))
    part = tuple(draw(st.lists(st.integers(1, 99), max_size=3)))
    text = draw(st.sampled_from(["", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"]))
    if part and draw(st.booleans()):
        text = "MIME"
    fields = ("FROM", "X-A") if text.startswith("HEADER.FIELDS") else ()
    partial = draw(st.none() | st.tuples(st.integers(0, 2**40), st.integers(1, 2**40)))
    item = ev.FetchItem("BODY", ev.Section(part, text, fields), partial, draw(st.booleans()))
    items = (ev.FetchItem("FLAGS"), item)
    line = f"{tag} FETCH {seq.to_wire()} ({' '.join(i.to_wire() for i in items)})"
    return line.encode(), ev.Fetch(tag, False, seq, items)


@st.composite
def _select(draw: st.DrawFn) -> tuple[bytes, ev.Event]:
    tag, name = draw(_TAG), draw(_NAME)
    if name.upper() == "INBOX":
        name = "INBOX"
    wire = encode_string(mutf7.encode(name), utf8=False)
    line = tag.encode() + b" EXAMINE " + wire
    return line, ev.Select(tag, name, readonly=True)


@FUZZ
@given(st.one_of(_login(), _store(), _fetch(), _select()))
def test_generated_commands_round_trip(case: tuple[bytes, ev.Event]) -> None:
    wire, expected = case
    core = ImapServerCore()
    if not isinstance(expected, ev.Login):
        core.greeting("hi", preauth=True)
    if isinstance(expected, ev.Store | ev.Fetch):
        core.receive_data(b"s SELECT INBOX\r\n")
        core.next_event()
        core.tagged("OK")
    core.receive_data(wire + b"\r\n")
    while True:
        event = core.next_event()
        if isinstance(event, ev.LiteralExpected):
            core.continue_literal()
            continue
        break
    assert event == expected
