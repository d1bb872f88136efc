"""The IMAP server core: RFC 9051 transcripts per command, the state
machine (§3), literals (§4.3, RFC 7888), and every bound of issue #13."""

from __future__ import annotations

import datetime as dt

import pytest

from postoffice.protocol import imap_events as ev
from postoffice.protocol.errors import LocalProtocolError
from postoffice.protocol.imap import ImapServerCore, ImapState
from postoffice.protocol.imap_response import (
    Atom,
    Mailbox,
    Raw,
    ResponseCode,
    encode_string,
    status_line,
)


def core(
    state: ImapState = ImapState.NOT_AUTHENTICATED,
    *,
    max_line: int = 65536,
    max_command: int = 1 << 20,
    max_append: int = 50 << 20,
    literal_plus: bool = True,
) -> ImapServerCore:
    c = ImapServerCore(
        max_line=max_line, max_command=max_command, max_append=max_append,
        literal_plus=literal_plus,
    )  # fmt: skip
    if state in (ImapState.AUTHENTICATED, ImapState.SELECTED):
        c.greeting("hi", preauth=True)
    if state is ImapState.SELECTED:
        c.receive_data(b"s SELECT INBOX\r\n")
        assert isinstance(c.next_event(), ev.Select)
        c.tagged("OK")
    return c


def one(c: ImapServerCore, data: bytes) -> ev.Event | None:
    c.receive_data(data)
    return c.next_event()


# --- commands (RFC 9051 §6) ------------------------------------------------------


def test_login_with_literals_asks_for_continuation() -> None:
    c = core()
    assert one(c, b"a1 LOGIN {5}\r\n") == ev.LiteralExpected("a1", 5)
    assert c.continue_literal() == b"+ Ready for literal data\r\n"
    assert one(c, b'alice "p\\"w\\\\d"\r\n') == ev.Login("a1", "alice", 'p"w\\d')
    assert c.tagged("OK", "LOGIN completed") == b"a1 OK LOGIN completed\r\n"
    assert c.state is ImapState.AUTHENTICATED


def test_non_synchronizing_literals_span_lines() -> None:
    c = core()
    assert one(c, b"a LOGIN {5+}\r\nalice {3-}\r\npwd\r\n") == ev.Login("a", "alice", "pwd")


def test_authenticate_with_sasl_ir_and_continuations() -> None:
    c = core()
    assert one(c, b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n") == ev.Authenticate(
        "a", "PLAIN", "AGFsaWNlAHB3"
    )
    c.tagged("OK")
    assert c.state is ImapState.AUTHENTICATED
    c = core()
    assert one(c, b"b authenticate login\r\n") == ev.Authenticate("b", "LOGIN", None)
    assert c.continuation("VXNlcm5hbWU6") == b"+ VXNlcm5hbWU6\r\n"
    assert c.state is ImapState.SASL
    assert one(c, b"YWxpY2U=\r\n") == ev.AuthResponse("b", "YWxpY2U=")
    c.continuation("")
    assert one(c, b"*\r\n") == ev.AuthResponse("b", "*")
    assert c.tagged("BAD", "cancelled") == b"b BAD cancelled\r\n"
    assert c.state is ImapState.NOT_AUTHENTICATED


def test_select_examine_condstore_qresync() -> None:
    c = core(ImapState.AUTHENTICATED)
    assert one(c, b"a select inbox (CONDSTORE)\r\n") == ev.Select("a", "INBOX", condstore=True)
    c.tagged("OK", code=ResponseCode("READ-WRITE"))
    assert c.state is ImapState.SELECTED
    event = one(c, b"b EXAMINE Work (QRESYNC (67890007 20050715194045000 41,43:211 (1,3 5,7)))\r\n")
    assert event == ev.Select(
        "b", "Work", readonly=True,
        qresync=ev.QresyncParams(67890007, 20050715194045000,
                                 ev.SequenceSet(((41, 41), (43, 211))),
                                 (ev.SequenceSet(((1, 1), (3, 3))), ev.SequenceSet(((5, 5), (7, 7))))),
    )  # fmt: skip
    c.tagged("NO", "no such mailbox")
    assert c.state is ImapState.AUTHENTICATED  # RFC 9051 §6.3.2


def test_mailbox_commands() -> None:
    c = core(ImapState.AUTHENTICATED)
    cases = {
        b'a CREATE "Sent Items" (USE (\\sent))': ev.Create("a", "Sent Items", ("\\Sent",)),
        b"a DELETE foo": ev.Delete("a", "foo"),
        b"a RENAME foo bar": ev.Rename("a", "foo", "bar"),
        b"a SUBSCRIBE inbox": ev.Subscribe("a", "INBOX"),
        b"a UNSUBSCRIBE x": ev.Unsubscribe("a", "x"),
        b"a NAMESPACE": ev.Namespace("a"),
        b"a STATUS blurdybloop (UIDNEXT MESSAGES)": ev.Status(
            "a", "blurdybloop", ("UIDNEXT", "MESSAGES")
        ),
        b'a LIST "" *': ev.ListMailboxes("a", "", ("*",)),
        b'a LSUB "#news." "comp.mail.*"': ev.ListMailboxes(
            "a", "#news.", ("comp.mail.*",), lsub=True
        ),
        b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" (% "Other/%") RETURN (CHILDREN STATUS (UNSEEN))': (
            ev.ListMailboxes(
                "a",
                "",
                ("%", "Other/%"),
                ("SUBSCRIBED", "RECURSIVEMATCH"),
                ("CHILDREN", "STATUS"),
                ("UNSEEN",),
            )
        ),
        b"a GETQUOTAROOT INBOX": ev.GetQuotaRoot("a", "INBOX"),
        b'a GETQUOTA ""': ev.GetQuota("a", ""),
        b"a ENABLE CONDSTORE utf8=accept": ev.Enable("a", ("CONDSTORE", "UTF8=ACCEPT")),
        b'a ID ("name" "mbsync" "version" NIL)': ev.Id(
            "a", (("name", "mbsync"), ("version", None))
        ),
        b"a ID NIL": ev.Id("a", None),
        b"a COMPRESS deflate": ev.Compress("a", "DEFLATE"),
        b"a IDLE": ev.Idle("a"),
    }
    for line, expected in cases.items():
        assert one(c, line + b"\r\n") == expected, line
        c.tagged("OK")


def test_append_with_flags_date_and_literal() -> None:
    c = core(ImapState.AUTHENTICATED)
    assert one(c, b'A003 APPEND saved-messages (\\Seen) " 7-Feb-1994 21:52:25 -0800" {9}\r\n') == (
        ev.LiteralExpected("A003", 9)
    )
    c.continue_literal()
    event = one(c, b"Hi\r\nthere\r\n")
    tz = dt.timezone(-dt.timedelta(hours=8))
    assert event == ev.Append(
        "A003", "saved-messages", ("\\Seen",), dt.datetime(1994, 2, 7, 21, 52, 25, tzinfo=tz),
        b"Hi\r\nthere",
    )  # fmt: skip
    assert c.tagged("OK", "", ResponseCode("APPENDUID", (38505, 3955))) == (
        b"A003 OK [APPENDUID 38505 3955] ok\r\n"
    )
    assert one(c, b"b APPEND x ~{3+}\r\na\x00b\r\n") == ev.Append(
        "b", "x", (), None, b"a\x00b", binary=True
    )


def test_selected_state_commands() -> None:
    c = core(ImapState.SELECTED)
    body = ev.FetchItem("BODY", ev.Section((1, 2), "HEADER.FIELDS", ("FROM", "TO")), (0, 100), True)
    cases = {
        b"a FETCH 2:4 (FLAGS BODY.PEEK[1.2.HEADER.FIELDS (From To)]<0.100>)": ev.Fetch(
            "a", False, ev.SequenceSet(((2, 4),)), (ev.FetchItem("FLAGS"), body)
        ),
        b"a UID FETCH 1:* FAST (CHANGEDSINCE 12345 VANISHED)": ev.Fetch(
            "a", True, ev.SequenceSet(((1, None),)),
            tuple(ev.FetchItem(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "UID")),
            12345, True,
        ),
        b"a FETCH $ (BINARY.PEEK[1]<0.10> BINARY.SIZE[2] MODSEQ BODY[])": ev.Fetch(
            "a", False, ev.SequenceSet(saved=True),
            (ev.FetchItem("BINARY", ev.Section((1,)), (0, 10), True),
             ev.FetchItem("BINARY.SIZE", ev.Section((2,))), ev.FetchItem("MODSEQ"),
             ev.FetchItem("BODY", ev.Section())),
        ),
        b"a STORE 2:4 +FLAGS (\\Deleted)": ev.Store(
            "a", False, ev.SequenceSet(((2, 4),)), "+", False, ("\\Deleted",)
        ),
        b"a UID STORE 5 (UNCHANGEDSINCE 320162338) FLAGS.SILENT \\seen $Junk": ev.Store(
            "a", True, ev.SequenceSet(((5, 5),)), "", True, ("\\Seen", "$Junk"), 320162338
        ),
        b"a UID MOVE 42:69 foo": ev.Copy("a", True, ev.SequenceSet(((42, 69),)), "foo", True),
        b"a COPY 2:4 meeting": ev.Copy("a", False, ev.SequenceSet(((2, 4),)), "meeting"),
        b"a UID EXPUNGE 3000:3002": ev.Expunge("a", ev.SequenceSet(((3000, 3002),))),
        b"a EXPUNGE": ev.Expunge("a"),
        b"a CHECK": ev.Check("a"),
        b"a SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR FROM x (NOT SEEN 2:4) MODSEQ 5": ev.Search(
            "a", False,
            ev.SearchKey("AND", (
                ev.SearchKey("OR", (ev.SearchKey("FROM", ("x",)), ev.SearchKey("AND", (
                    ev.SearchKey("NOT", (ev.SearchKey("SEEN"),)),
                    ev.SearchKey("SEQ", (ev.SequenceSet(((2, 4),)),)))))),
                ev.SearchKey("MODSEQ", (5,)))),
            "UTF-8", ("MIN", "COUNT"),
        ),
        b'a UID SEARCH SINCE "1-Feb-1994" HEADER Subject {2+}\r\nhi UID 1:*': ev.Search(
            "a", True,
            ev.SearchKey("AND", (ev.SearchKey("SINCE", (dt.date(1994, 2, 1),)),
                                 ev.SearchKey("HEADER", ("Subject", "hi")),
                                 ev.SearchKey("UID", (ev.SequenceSet(((1, None),)),)))),
        ),
    }  # fmt: skip
    for line, expected in cases.items():
        assert one(c, line + b"\r\n") == expected, line
        c.tagged("OK")
    assert one(c, b"a SEARCH CHARSET KOI8-R ALL\r\n") == ev.Rejected(
        "a", "Unsupported charset", "NO", "BADCHARSET"
    )
    assert c.reply_rejected() == b"a NO [BADCHARSET (UTF-8 US-ASCII)] Unsupported charset\r\n"
    assert one(c, b"a CLOSE\r\n") == ev.Close("a")
    c.tagged("OK")
    assert c.state is ImapState.AUTHENTICATED


def test_fetch_macros() -> None:
    c = core(ImapState.SELECTED)
    event = one(c, b"a FETCH 1 FULL\r\n")
    assert isinstance(event, ev.Fetch)
    assert [i.name for i in event.items] == [
        "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY",
    ]  # fmt: skip


# --- the state machine (RFC 9051 §3) --------------------------------------------


@pytest.mark.parametrize(
    ("state", "line"),
    [
        (ImapState.NOT_AUTHENTICATED, b"a SELECT INBOX"),
        (ImapState.NOT_AUTHENTICATED, b"a FETCH 1 FLAGS"),
        (ImapState.AUTHENTICATED, b"a FETCH 1 FLAGS"),
        (ImapState.AUTHENTICATED, b"a LOGIN a b"),
        (ImapState.AUTHENTICATED, b"a STARTTLS"),
        (ImapState.SELECTED, b"a ENABLE CONDSTORE"),
    ],
)
def test_command_in_wrong_state_is_bad(state: ImapState, line: bytes) -> None:
    c = core(state)
    event = one(c, line + b"\r\n")
    assert isinstance(event, ev.Rejected) and event.tag == "a" and event.status == "BAD"
    assert c.reply_rejected().startswith(b"a BAD ")
    assert c.state is state


def test_append_literal_refused_in_wrong_state_before_reading() -> None:
    c = core()
    event = one(c, b"a APPEND INBOX {10485760}\r\n")
    assert isinstance(event, ev.Rejected) and event.status == "BAD"
    c.reply_rejected()
    assert one(c, b"b NOOP\r\n") == ev.Noop("b")


def test_starttls_refused_with_pipelined_data() -> None:
    c = core()
    event = one(c, b"a STARTTLS\r\nb LOGIN x y\r\n")
    assert isinstance(event, ev.Rejected) and event.fatal
    assert c.reply_rejected().endswith(b"* BYE Too much input refused\r\n")
    assert c.state is ImapState.LOGOUT
    assert c.next_event() is None


def test_starttls_ok_discards_nothing_and_waits_for_handshake() -> None:
    c = core()
    assert one(c, b"a STARTTLS\r\n") == ev.StartTls("a")
    c.tagged("OK", "Begin TLS negotiation now")
    assert c.state is ImapState.TLS_PENDING
    c.receive_data(b"b LOGIN injected\r\n")  # before the handshake: never acted on
    assert c.next_event() is None
    c.tls_established()
    assert c.tls and c.state is ImapState.NOT_AUTHENTICATED
    assert one(c, b"c STARTTLS\r\n") == ev.Rejected("c", "TLS is already active")


def test_starttls_ok_with_data_buffered_is_our_bug() -> None:
    c = core()
    assert one(c, b"a STARTTLS\r\n") == ev.StartTls("a")
    c.receive_data(b"b NOOP\r\n")
    with pytest.raises(LocalProtocolError):
        c.tagged("OK")


def test_idle_until_done() -> None:
    c = core(ImapState.SELECTED)
    assert one(c, b"a IDLE\r\n") == ev.Idle("a")
    assert c.continuation("idling") == b"+ idling\r\n"
    assert c.state is ImapState.IDLE
    assert c.untagged(4, Atom("EXISTS")) == b"* 4 EXISTS\r\n"
    assert one(c, b"done\r\n") == ev.IdleDone("a")
    assert c.tagged("OK", "IDLE terminated") == b"a OK IDLE terminated\r\n"
    assert c.state is ImapState.SELECTED
    one(c, b"b IDLE\r\n")
    c.continuation("idling")
    assert one(c, b"c NOOP\r\n") == ev.Rejected("b", "Expected DONE")


def test_logout() -> None:
    c = core(ImapState.SELECTED)
    assert one(c, b"a LOGOUT\r\n") == ev.Logout("a")
    assert c.bye("bye") == b"* BYE bye\r\n"
    c.tagged("OK")
    assert c.state is ImapState.LOGOUT


def test_answer_out_of_sequence_is_local_error() -> None:
    c = core()
    with pytest.raises(LocalProtocolError):
        c.tagged("OK")
    one(c, b"a NOOP\r\n")
    with pytest.raises(LocalProtocolError):
        c.next_event()
    with pytest.raises(LocalProtocolError):
        c.continuation()


def test_enable_utf8_switches_mailbox_names() -> None:
    c = core(ImapState.AUTHENTICATED)
    assert one(c, b"a SELECT &AOk-t&AOk-\r\n") == ev.Select("a", "été")
    c.tagged("NO")
    c.enable("IMAP4rev2")
    assert one(c, 'b SELECT "&AOk-t\u00e9"\r\n'.encode()) == ev.Select("b", "&AOk-t\u00e9")
    c.tagged("NO")
    assert c.untagged(Atom("LIST"), [], "/", Mailbox("\u00e9t\u00e9")) == (
        '* LIST () "/" "\u00e9t\u00e9"\r\n'.encode()
    )


# --- bounds ---------------------------------------------------------------------


def test_100_kib_line_gets_clean_error_and_is_skipped() -> None:
    c = core()
    event = one(c, b"a1 " + b"x" * 100 * 1024 + b"\r\nb NOOP\r\n")
    assert isinstance(event, ev.Rejected) and event.tag == "a1" and event.text == "Line too long"
    c.reply_rejected()
    assert c.next_event() == ev.Noop("b")


def test_long_line_arriving_in_pieces_is_not_buffered() -> None:
    c = core(max_line=1000)
    for _ in range(100):
        c.receive_data(b"y" * 1000)
        assert c.next_event() is None
        assert c.buffered <= 1000
    event = one(c, b"\r\n")
    assert isinstance(event, ev.Rejected) and event.tag is None
    assert c.reply_rejected() == b"* BAD Line too long\r\n"


def test_1000_nested_parentheses_do_no_harm() -> None:
    c = core(ImapState.SELECTED)
    event = one(c, b"a SEARCH " + b"(" * 1000 + b"ALL" + b")" * 1000 + b"\r\n")
    assert event == ev.Rejected("a", "Nested too deeply")
    c.reply_rejected()
    event = one(c, b"b SEARCH " + b"NOT " * 1000 + b"ALL\r\n")
    assert event == ev.Rejected("b", "Nested too deeply")
    c.reply_rejected()
    event = one(c, b"c STORE 1 FLAGS " + b"(" * 1000 + b"\r\n")
    assert isinstance(event, ev.Rejected) and event.tag == "c"


def test_huge_synchronizing_literal_refused_before_reading() -> None:
    c = core(ImapState.AUTHENTICATED, max_append=1 << 20)
    event = one(c, b"a APPEND INBOX {10485760}\r\n")
    assert event == ev.Rejected("a", "Literal too big", "NO", "TOOBIG")
    assert c.reply_rejected() == b"a NO [TOOBIG] Literal too big\r\n"
    assert one(c, b"b NOOP\r\n") == ev.Noop("b")
    c.tagged("OK")
    event = one(c, b"c LOGIN {99999999999999999999}\r\n")
    assert isinstance(event, ev.Rejected)


def test_huge_non_synchronizing_literal_ends_the_connection() -> None:
    c = core(ImapState.AUTHENTICATED, max_append=1 << 20)
    event = one(c, b"a APPEND INBOX {10485760+}\r\n" + b"x" * 1000)
    assert event == ev.Rejected("a", "Literal too big", "BAD", "TOOBIG", fatal=True)
    assert (
        c.reply_rejected() == b"a BAD [TOOBIG] Literal too big\r\n* BYE Too much input refused\r\n"
    )
    assert c.state is ImapState.LOGOUT


def test_small_refused_non_synchronizing_literal_is_skipped_with_its_command() -> None:
    c = core(literal_plus=False)  # LITERAL-: {n+} at most 4096 (RFC 7888 §4)
    event = one(c, b"a LOGIN {5000+}\r\n" + b"x" * 5000 + b" {3+}\r\npwd\r\nb NOOP\r\n")
    assert event == ev.Rejected("a", "Literal too big", "BAD", "TOOBIG")
    c.reply_rejected()
    assert c.next_event() == ev.Noop("b")


def test_command_size_bound() -> None:
    c = core(max_command=100)
    event = one(c, b"a LOGIN {60}\r\n")
    assert isinstance(event, ev.LiteralExpected)
    c.continue_literal()
    event = one(c, b"u" * 60 + b" {60}\r\n")
    assert event == ev.Rejected("a", "Literal too big", "NO", "TOOBIG")


def test_huge_sequence_set() -> None:
    c = core(ImapState.SELECTED)
    seq = b"1:2," * 10000 + b"3"
    event = one(c, b"a FETCH " + seq + b" FLAGS\r\n")
    assert event == ev.Rejected("a", "Too many ranges in sequence set")
    c.reply_rejected()
    event = one(c, b"b FETCH 1:99999999999 FLAGS\r\n")
    assert event == ev.Rejected("b", "Number out of range")


@pytest.mark.parametrize(
    "line",
    [b"", b"+ NOOP", b"a", b"a FOO", b"a NOOP extra", b'a LOGIN "x', b"a LOGIN x\x00 y",
     b"a FETCH 0 FLAGS", b"a LOGIN \"a\\x\" b", b"a UID CLOSE"],
)  # fmt: skip
def test_malformed_lines_are_bad(line: bytes) -> None:
    c = core(ImapState.SELECTED)
    event = one(c, line + b"\r\n")
    assert isinstance(event, ev.Rejected) and event.status == "BAD"


# --- responses (RFC 9051 §7) ------------------------------------------------------


def test_strings_are_never_emitted_unsafe() -> None:
    assert encode_string("abc", utf8=False) == b'"abc"'
    assert encode_string('a"b\\c', utf8=False) == b'"a\\"b\\\\c"'
    assert encode_string("a\r\nb", utf8=False) == b"{4}\r\na\r\nb"
    assert encode_string("\u00e9", utf8=False) == b"{2}\r\n\xc3\xa9"
    assert encode_string("\u00e9", utf8=True) == b'"\xc3\xa9"'
    assert status_line("a", "OK", "x\r\n* BYE") == b"a OK x  * BYE\r\n"
    with pytest.raises(ValueError):
        Atom("two words")
    with pytest.raises(ValueError):
        Raw("x\r\n")


def test_untagged_fetch_response() -> None:
    c = core(ImapState.SELECTED)
    out = c.untagged(
        12, Atom("FETCH"),
        [Atom("FLAGS"), [Atom("\\Seen")], Atom("UID"), 7,
         Raw("BODY[HEADER.FIELDS (FROM)]"), b"From: a\r\n\r\n", Atom("ENVELOPE"), [None, "s"]],
    )  # fmt: skip
    assert out == (
        b"* 12 FETCH (FLAGS (\\Seen) UID 7 BODY[HEADER.FIELDS (FROM)] {11}\r\nFrom: a\r\n\r\n"
        b' ENVELOPE (NIL "s"))\r\n'
    )
    code = ResponseCode("PERMANENTFLAGS", ([Atom("\\Deleted"), Atom("\\*")],))
    assert (
        c.untagged_status("OK", "Limited", code)
        == b"* OK [PERMANENTFLAGS (\\Deleted \\*)] Limited\r\n"
    )
    assert c.greeting("ready", ResponseCode("CAPABILITY", (Atom("IMAP4rev2"),))) == (
        b"* OK [CAPABILITY IMAP4rev2] ready\r\n"
    )
