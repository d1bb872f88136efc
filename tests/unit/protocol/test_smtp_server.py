"""The sans-I/O SMTP server core: transcripts per RFC section, bytes in, events out.

A ``Dialogue`` plays the session: it feeds bytes, answers every event with a
fixed policy (or a reply the test chooses) and records events and output.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.mail.address import Address
from postoffice.protocol.dsn_params import MessageDsn, RecipientDsn
from postoffice.protocol.errors import LocalProtocolError
from postoffice.protocol.smtp_reply import Reply
from postoffice.protocol.smtp_server import (
    Auth,
    AuthResponse,
    ChunkComplete,
    ChunkStart,
    DataChunk,
    DataComplete,
    DataRequested,
    Event,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rejected,
    Reset,
    SmtpServerCore,
    SmtpState,
    StartTls,
    Verify,
)

OK = Reply(250, "Ok", "2.0.0")


def default_answer(event: Event) -> Reply:
    """A session that accepts everything it can."""
    match event:
        case Rejected(reply=reply):
            return reply
        case DataRequested():
            return Reply(354, "End data with <CR><LF>.<CR><LF>")
        case Quit():
            return Reply(221, "Bye", "2.0.0")
        case StartTls():
            return Reply(220, "Ready to start TLS", "2.0.0")
        case Auth() | AuthResponse() if getattr(event, "line", "") == "*":
            return Reply(501, "Cancelled", "5.0.0")
        case Auth(initial_response=None):
            return Reply(334, "")
        case Auth() | AuthResponse():
            return Reply(235, "Authentication successful", "2.7.0")
        case Verify():
            return Reply(252, "Cannot VRFY", "2.5.2")
        case Help():
            return Reply(214, "See RFC 5321", "2.0.0")
    return OK


Answer = Callable[[Event], Reply]


class Dialogue:
    def __init__(self, answer: Answer = default_answer, **limits: int) -> None:
        self.core = SmtpServerCore(
            max_message_size=limits.pop("max_message_size", 10_000), **limits
        )
        self.answer = answer
        self.output = bytearray()

    def feed(self, data: bytes, answer: Answer | None = None) -> list[Event]:
        """Feed ``data``; answer and return every event it produces."""
        self.core.receive_data(data)
        events: list[Event] = []
        while (event := self.core.next_event()) is not None:
            events.append(event)
            if not isinstance(event, DataChunk | ChunkStart):
                self.output += self.core.send((answer or self.answer)(event))
        return events

    def one(self, data: bytes, answer: Answer | None = None) -> Event:
        events = self.feed(data, answer)
        assert len(events) == 1, events
        return events[0]

    def greeted(self, name: str = "client.example") -> Dialogue:
        assert self.one(f"EHLO {name}\r\n".encode()) == Hello(name, True)
        return self

    def in_transaction(self) -> Dialogue:
        self.greeted()
        assert isinstance(self.one(b"MAIL FROM:<a@example.org>\r\n"), MailFrom)
        assert isinstance(self.one(b"RCPT TO:<b@example.net>\r\n"), RcptTo)
        return self


def rejected(event: Event) -> tuple[int, str | None]:
    assert isinstance(event, Rejected), event
    return event.reply.code, event.reply.enhanced


def merged(events: list[Event]) -> list[Event]:
    """Consecutive DataChunks joined: how content is split is not an event."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


# --- replies (RFC 5321 §4.2, RFC 2034) -----------------------------------------


def test_reply_single_line() -> None:
    assert Reply(250, "Ok").to_bytes() == b"250 Ok\r\n"
    assert Reply(250, "Ok", "2.1.0").to_bytes() == b"250 2.1.0 Ok\r\n"


def test_reply_multi_line_enhanced_on_every_line() -> None:
    reply = Reply(250, ("mx.example greets you", "PIPELINING", "SIZE 1000"), "2.0.0")
    assert reply.to_bytes() == (
        b"250-2.0.0 mx.example greets you\r\n250-2.0.0 PIPELINING\r\n250 2.0.0 SIZE 1000\r\n"
    )
    assert Reply(250, ("a", "b")).to_bytes() == b"250-a\r\n250 b\r\n"


def test_reply_text_cannot_inject_lines() -> None:
    data = Reply(550, "no such user\r\n250 Ok\nx\r", "5.1.1").to_bytes()
    assert data.count(b"\r\n") == 1 and data.endswith(b"\r\n")
    assert b"\n" not in data[:-1] and b"\r" not in data[:-2]
    assert Reply(250, ("a\r\nb",)).to_bytes() == b"250 a  b\r\n"


def test_reply_empty_text_keeps_the_space_for_sasl() -> None:
    assert Reply(334, "").to_bytes() == b"334 \r\n"
    assert Reply(250, (), "2.0.0").to_bytes() == b"250 2.0.0\r\n"


def test_reply_str_is_the_wire_text() -> None:
    assert str(Reply(250, ("a", "b"), "2.0.0")) == "250-2.0.0 a\r\n250 2.0.0 b"


def test_reply_text_goes_out_as_ascii() -> None:
    """RFC 5321 §2.4: reply text is US-ASCII; anything else becomes "?"."""
    assert Reply(250, "Ok für dich").to_bytes() == b"250 Ok f?r dich\r\n"
    assert Reply(550, ("§2.3.8", "j\u00f6\ud800@x"), "5.6.0").to_bytes() == (
        b"550-5.6.0 ?2.3.8\r\n550 5.6.0 j??@x\r\n"
    )


@pytest.mark.parametrize("code", [0, 99, 199, 600, 261, 1000])
def test_reply_code_must_be_valid(code: int) -> None:
    with pytest.raises(ValueError):
        Reply(code, "x")


def test_reply_enhanced_must_be_valid() -> None:
    with pytest.raises(ValueError):
        Reply(250, "x", "2.0")
    with pytest.raises(ValueError):
        Reply(250, "x", "3.0.0")


def test_reply_classes() -> None:
    assert Reply(250, "").is_positive and Reply(354, "").is_positive
    assert not Reply(421, "").is_positive and Reply(421, "").is_transient
    assert Reply(550, "").is_permanent and not Reply(550, "").is_transient


# --- RFC 5321 §3.1, §4.1.1.1: greeting and EHLO/HELO --------------------------------


def test_greeting_is_unsolicited_and_changes_nothing() -> None:
    core = SmtpServerCore(1000)
    assert core.send_unsolicited(Reply(220, "mx.example ESMTP")) == b"220 mx.example ESMTP\r\n"
    assert core.state is SmtpState.START
    assert core.next_event() is None


def test_ehlo_and_helo() -> None:
    d = Dialogue()
    assert d.one(b"EHLO client.example\r\n") == Hello("client.example", True)
    assert d.core.state is SmtpState.GREETED and d.core.extended
    assert d.one(b"helo [192.0.2.1]\r\n") == Hello("[192.0.2.1]", False)
    assert not d.core.extended


def test_ehlo_refused_leaves_the_client_ungreeted() -> None:
    d = Dialogue()
    d.one(b"EHLO x\r\n", lambda e: Reply(550, "go away", "5.7.1"))
    assert d.core.state is SmtpState.START
    assert rejected(d.one(b"MAIL FROM:<>\r\n")) == (503, "5.5.1")


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"EHLO \r\n", b"HELO a b\r\n", b"EHLO a\x01b\r\n"])
def test_hello_argument_is_validated(line: bytes) -> None:
    assert rejected(Dialogue().one(line)) == (501, "5.5.4")


def test_ehlo_resets_a_transaction() -> None:
    """RFC 5321 §4.1.4: EHLO in a transaction is like RSET."""
    d = Dialogue().in_transaction()
    assert d.core.state is SmtpState.RCPT
    d.one(b"EHLO again\r\n")
    assert d.core.state is SmtpState.GREETED and d.core.recipient_count == 0


def test_commands_are_case_insensitive_and_accept_bare_lf() -> None:
    d = Dialogue()
    assert d.feed(b"ehlo x\nmail from:<a@b.example>\nrcpt to:<c@d.example>\nnoop\n") == [
        Hello("x", True),
        MailFrom(Address("a", "b.example"), None, None, False, {}),
        RcptTo(Address("c", "d.example"), {}),
        Noop(),
    ]


# --- RFC 5321 §4.1.1.2: MAIL ------------------------------------------------------


def test_mail_before_hello_is_a_bad_sequence() -> None:
    assert rejected(Dialogue().one(b"MAIL FROM:<a@b.example>\r\n")) == (503, "5.5.1")


def test_mail_and_null_sender() -> None:
    d = Dialogue().greeted()
    assert d.one(b"MAIL FROM:<>\r\n") == MailFrom(None, None, None, False, {})
    assert d.core.state is SmtpState.MAIL and d.core.in_transaction


def test_mail_refused_opens_no_transaction() -> None:
    d = Dialogue().greeted()
    d.one(b"MAIL FROM:<a@b.example>\r\n", lambda e: Reply(550, "no", "5.7.1"))
    assert not d.core.in_transaction
    assert rejected(d.one(b"RCPT TO:<c@d.example>\r\n")) == (503, "5.5.1")


def test_nested_mail_is_refused() -> None:
    d = Dialogue().greeted()
    d.one(b"MAIL FROM:<a@b.example>\r\n")
    assert rejected(d.one(b"MAIL FROM:<a@b.example>\r\n")) == (503, "5.5.1")


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM: <a@b.example>\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
        b"MAIL  FROM:<a@b.example>  \r\n",
        b"Mail From:<a@B.Example>\r\n",
        b"MAIL FROM:<@relay.example,@r2.example:a@b.example>\r\n",
    ],
)
def test_mail_syntax_leniency(line: bytes) -> None:
    event = Dialogue().greeted().one(line)
    assert isinstance(event, MailFrom)
    assert event.sender == Address("a", "b.example")


def test_mail_parameters() -> None:
    d = Dialogue().greeted()
    event = d.one(
        b"MAIL FROM:<a@b.example> SIZE=1234 body=8bitmime RET=HDRS ENVID=QQ314159 AUTH=<>\r\n"
    )
    assert event == MailFrom(
        Address("a", "b.example"),
        1234,
        "8BITMIME",
        False,
        {"SIZE": "1234", "BODY": "8bitmime", "RET": "HDRS", "ENVID": "QQ314159", "AUTH": "<>"},
        MessageDsn("HDRS", "QQ314159"),
    )


def test_mail_size_beyond_twenty_digits_is_a_size_too_big() -> None:
    """RFC 1870 §6.1: a size over the limit is 552 (the session's verdict),
    however many digits it has; not a syntax error."""
    event = Dialogue().greeted().one(b"MAIL FROM:<a@b.example> SIZE=" + b"9" * 60 + b"\r\n")
    assert isinstance(event, MailFrom) and event.size is not None and event.size >= 10**20


def test_mail_smtputf8() -> None:
    """RFC 6531 §3.4: SMTPUTF8 allows a UTF-8 address."""
    d = Dialogue().greeted()
    event = d.one("MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode())
    assert isinstance(event, MailFrom)
    assert event.smtputf8 and event.sender == Address("jörg", "xn--bcher-kva.example")
    event = d.one("RCPT TO:<ñandú@example.org>\r\n".encode())
    assert isinstance(event, RcptTo) and event.recipient.local == "ñandú"


def test_non_ascii_address_without_smtputf8() -> None:
    d = Dialogue().greeted()
    assert rejected(d.one("MAIL FROM:<jörg@example.org>\r\n".encode())) == (553, "5.6.7")
    d.one(b"MAIL FROM:<a@b.example>\r\n")
    assert rejected(d.one("RCPT TO:<jörg@example.org>\r\n".encode())) == (553, "5.6.7")


def test_quoted_local_part_with_special_characters() -> None:
    event = Dialogue().greeted().one(b'MAIL FROM:<"odd > one"@b.example> SIZE=10\r\n')
    assert isinstance(event, MailFrom)
    assert event.sender == Address('"odd > one"', "b.example") and event.size == 10


def test_quoted_local_part_with_escapes() -> None:
    event = Dialogue().greeted().one(b'MAIL FROM:<"a\\"> b"@b.example> BODY=7BIT\r\n')
    assert isinstance(event, MailFrom)
    assert event.sender == Address('"a\\"> b"', "b.example") and event.body == "7BIT"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"MAIL\r\n", (501, "5.5.2")),
        (b"MAIL TO:<a@b.example>\r\n", (501, "5.5.2")),
        (b"MAIL FROM:a@b.example\r\n", (501, "5.5.2")),
        (b"MAIL FROM:<a@b.example\r\n", (501, "5.5.2")),
        (b"MAIL FROM:<a@b.example>SIZE=1\r\n", (501, "5.5.2")),
        (b"MAIL FROM:<a@@b.example>\r\n", (501, "5.1.7")),
        (b"MAIL FROM:<a@-b.example>\r\n", (501, "5.1.7")),
        (b"MAIL FROM:<a>\r\n", (501, "5.1.7")),
        (b"MAIL FROM:<a@b.example> SIZE=big\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> SIZE\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> SMTPUTF8=yes\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> RET=ALL\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> =x\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> ENVID=a+zz\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> AUTH\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example> X-FOO=1\r\n", (555, "5.5.4")),
        (b"MAIL FROM:<a@b.example> NOTIFY=NEVER\r\n", (555, "5.5.4")),
        (b"MAIL FROM:<a@b.example> ENVID=" + b"x" * 101 + b"\r\n", (501, "5.5.4")),  # §4.4
        (b"MAIL FROM:<a@b.example> ENVID=a+2\r\n", (501, "5.5.4")),  # not xtext
        (b"MAIL FROM:<a@b.example> RET=BODY\r\n", (501, "5.5.4")),
        (b"MAIL FROM:<a@b.example\xff>\r\n", (501, "5.5.2")),
    ],
)
def test_mail_errors(line: bytes, expected: tuple[int, str]) -> None:
    d = Dialogue().greeted()
    assert rejected(d.one(line)) == expected
    assert not d.core.in_transaction


# --- RFC 5321 §4.1.1.3: RCPT ------------------------------------------------------


def test_rcpt_without_mail() -> None:
    assert rejected(Dialogue().greeted().one(b"RCPT TO:<a@b.example>\r\n")) == (503, "5.5.1")


def test_rcpt_counts_only_accepted_recipients() -> None:
    d = Dialogue().greeted()
    d.one(b"MAIL FROM:<>\r\n")
    d.one(b"RCPT TO:<a@b.example>\r\n", lambda e: Reply(550, "unknown", "5.1.1"))
    assert d.core.recipient_count == 0 and d.core.state is SmtpState.MAIL
    d.one(b"RCPT TO:<c@b.example>\r\n")
    d.one(b"RCPT TO:<d@b.example>\r\n")
    assert d.core.recipient_count == 2 and d.core.state is SmtpState.RCPT


@pytest.mark.parametrize("path", [b"<postmaster>", b"<Postmaster>", b"<POSTMASTER>"])
def test_rcpt_bare_postmaster(path: bytes) -> None:
    """RFC 5321 §4.1.1.3: <postmaster> without a domain must be accepted."""
    d = Dialogue().greeted()
    d.one(b"MAIL FROM:<>\r\n")
    assert d.one(b"RCPT TO:" + path + b"\r\n") == RcptTo(Address("postmaster", ""), {})


def test_rcpt_dsn_parameters() -> None:
    d = Dialogue().greeted()
    d.one(b"MAIL FROM:<>\r\n")
    event = d.one(b"RCPT TO: <a@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.example\r\n")
    assert event == RcptTo(
        Address("a", "b.example"),
        {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b.example"},
        RecipientDsn(frozenset({"SUCCESS", "FAILURE"}), "rfc822;a@b.example"),
    )
    assert event.dsn.wants("SUCCESS") and not event.dsn.wants("DELAY")
    never = d.one(b"RCPT TO:<c@b.example> NOTIFY=never\r\n")
    assert isinstance(never, RcptTo) and never.dsn.notify == frozenset()
    assert not any(never.dsn.wants(k) for k in ("SUCCESS", "FAILURE", "DELAY"))
    plain = d.one(b"RCPT TO:<e@b.example>\r\n")
    # RFC 3461 §4.1: no NOTIFY means failure and delay notices, not success.
    assert isinstance(plain, RcptTo) and plain.dsn.wants("FAILURE") and plain.dsn.wants("DELAY")
    assert not plain.dsn.wants("SUCCESS")
    # RFC 3464 §2.3.1: the report shows ORCPT's address xtext-decoded.
    orcpt = d.one(b"RCPT TO:<f@b.example> ORCPT=rfc822;f+2Bx@b.example\r\n")
    assert isinstance(orcpt, RcptTo) and orcpt.dsn.original_recipient() == "rfc822; f+x@b.example"
    # RFC 3461 §4: a RCPT line 500 characters longer than 512 for ORCPT.
    long = b"rfc822;" + b"g" * 480 + b"@b.example"
    event = d.one(b"RCPT TO:<g@b.example> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=" + long + b"\r\n")
    assert isinstance(event, RcptTo) and event.dsn.orcpt == long.decode()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"RCPT TO:<>\r\n", (501, "5.1.3")),
        (b"RCPT TO:<nobody>\r\n", (501, "5.1.3")),
        (b"RCPT TO:<a@b..example>\r\n", (501, "5.1.3")),
        (b"RCPT FROM:<a@b.example>\r\n", (501, "5.5.2")),
        (b"RCPT TO:\r\n", (501, "5.5.2")),
        (b"RCPT TO:<a@b.example> NOTIFY=SOMETIMES\r\n", (501, "5.5.4")),
        (b"RCPT TO:<a@b.example> NOTIFY=NEVER,DELAY\r\n", (501, "5.5.4")),
        (b"RCPT TO:<a@b.example> ORCPT=a@b.example\r\n", (501, "5.5.4")),
        (b"RCPT TO:<a@b.example> ORCPT=rfc822;a+zz@b.example\r\n", (501, "5.5.4")),  # not xtext
        (b"RCPT TO:<a@b.example> ORCPT=rfc822;" + b"a" * 500 + b"\r\n", (501, "5.5.4")),
        (b"RCPT TO:<a@b.example> NOTIFY\r\n", (501, "5.5.4")),
        (b"RCPT TO:<a@b.example> SIZE=10\r\n", (555, "5.5.4")),
    ],
)
def test_rcpt_errors(line: bytes, expected: tuple[int, str]) -> None:
    d = Dialogue().greeted()
    d.one(b"MAIL FROM:<>\r\n")
    assert rejected(d.one(line)) == expected
    assert d.core.recipient_count == 0


# --- RFC 5321 §4.1.1.4: DATA ------------------------------------------------------


def test_full_transaction_transcript() -> None:
    d = Dialogue()
    d.output += d.core.send_unsolicited(Reply(220, "mx.example ESMTP"))
    assert d.feed(b"EHLO c.example\r\n") == [Hello("c.example", True)]
    assert d.feed(b"MAIL FROM:<a@b.example>\r\n") == [
        MailFrom(Address("a", "b.example"), None, None, False, {})
    ]
    assert d.feed(b"RCPT TO:<c@d.example>\r\n") == [RcptTo(Address("c", "d.example"), {})]
    assert d.feed(b"DATA\r\n") == [DataRequested()]
    assert d.core.state is SmtpState.DATA
    assert d.feed(b"Subject: t\r\n\r\n..hi\r\n") == [DataChunk(b"Subject: t\n\n.hi")]
    assert d.feed(b".\r\n") == [DataChunk(b"\n"), DataComplete(16, False, False, False, False)]
    assert d.core.state is SmtpState.GREETED and not d.core.in_transaction
    assert d.feed(b"QUIT\r\n") == [Quit()]
    assert d.core.closed and d.core.state is SmtpState.CLOSED
    assert bytes(d.output) == (
        b"220 mx.example ESMTP\r\n"
        b"250 2.0.0 Ok\r\n"
        b"250 2.0.0 Ok\r\n"
        b"250 2.0.0 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok\r\n"
        b"221 2.0.0 Bye\r\n"
    )


def test_data_without_mail_or_recipients() -> None:
    d = Dialogue().greeted()
    assert rejected(d.one(b"DATA\r\n")) == (503, "5.5.1")
    d.one(b"MAIL FROM:<>\r\n")
    assert rejected(d.one(b"DATA\r\n")) == (554, "5.5.1")


def test_data_takes_no_argument() -> None:
    assert rejected(Dialogue().in_transaction().one(b"DATA now\r\n")) == (501, "5.5.4")


def test_empty_message() -> None:
    d = Dialogue().in_transaction()
    assert d.feed(b"DATA\r\n.\r\n") == [
        DataRequested(),
        DataComplete(0, False, False, False, False),
    ]


def test_data_flags_reach_the_event() -> None:
    d = Dialogue(max_message_size=5, max_text_line=3).in_transaction()
    events = d.feed(b"DATA\r\nabcd\rx\nyz\r\n.\r\n")
    assert events[-1] == DataComplete(10, True, True, True, True)
    assert b"".join(e.data for e in events if isinstance(e, DataChunk)) == b"abcd\r"


def test_refused_data_leaves_following_bytes_as_commands() -> None:
    d = Dialogue().in_transaction()

    def refuse(event: Event) -> Reply:
        if isinstance(event, DataRequested):
            return Reply(451, "Try later", "4.3.0")
        return default_answer(event)

    events = d.feed(b"DATA\r\nNOOP\r\nRSET\r\n", refuse)
    assert events == [DataRequested(), Noop(), Reset()]
    assert not d.core.in_transaction


def test_data_complete_clears_the_transaction_whatever_the_answer() -> None:
    d = Dialogue().in_transaction()
    d.feed(b"DATA\r\n")
    d.feed(b"x\r\n.\r\n", lambda e: Reply(554, "rejected", "5.6.0"))
    assert d.core.state is SmtpState.GREETED
    assert rejected(d.one(b"RCPT TO:<a@b.example>\r\n")) == (503, "5.5.1")


def test_messages_back_to_back_in_one_chunk() -> None:
    d = Dialogue().greeted()
    msg = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nhi\r\n.\r\n"
    events = d.feed(msg * 3 + b"QUIT\r\n")
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["MailFrom", "RcptTo", "DataRequested", "DataChunk", "DataComplete"] * 3 + [
        "Quit"
    ]


def test_input_between_last_chunk_and_data_complete_is_commands() -> None:
    d = Dialogue().in_transaction()
    d.feed(b"DATA\r\n")
    core = d.core
    core.receive_data(b"hi\r\n.\r\n")
    assert core.next_event() == DataChunk(b"hi\n")
    core.receive_data(b"NOOP\r\n")  # arrives before DataComplete is taken
    assert core.next_event() == DataComplete(3, False, False, False, False)
    core.send(OK)
    assert core.next_event() == Noop()


def test_content_arriving_in_many_reads() -> None:
    d = Dialogue().in_transaction()
    events = d.feed(b"DATA\r\nfirst")  # "first" waits in the buffer for the 354
    for piece in (b" line\r\n", b"..second\r", b"\n", b".", b"\r\n", b"RSET\r\n"):
        d.core.receive_data(piece)
    events += d.feed(b"")
    assert merged(events) == [
        DataRequested(),
        DataChunk(b"first line\n.second\n"),
        DataComplete(19, False, False, False, False),
        Reset(),
    ]


# --- RSET, NOOP, QUIT, VRFY, HELP (§4.1.1.5 - §4.1.1.10) ----------------------------


def test_rset() -> None:
    d = Dialogue().in_transaction()
    assert d.one(b"RSET\r\n") == Reset()
    assert d.core.state is SmtpState.GREETED
    assert rejected(d.one(b"RSET all\r\n")) == (501, "5.5.4")


def test_rset_refused_keeps_the_transaction() -> None:
    d = Dialogue().in_transaction()
    d.one(b"RSET\r\n", lambda e: Reply(421, "closing", "4.3.0"))
    assert d.core.closed


def test_noop_quit_vrfy_help() -> None:
    d = Dialogue()
    assert d.feed(b"NOOP\r\nNOOP anything\r\nVRFY bob\r\nHELP\r\nHELP MAIL\r\n") == [
        Noop(),
        Noop(),
        Verify("bob"),
        Help(""),
        Help("MAIL"),
    ]
    assert rejected(d.one(b"VRFY\r\n")) == (501, "5.5.4")
    assert d.one(b"QUIT\r\n") == Quit()
    assert d.core.closed


def test_nothing_after_quit() -> None:
    d = Dialogue()
    assert d.feed(b"QUIT\r\nNOOP\r\n") == [Quit()]
    d.core.receive_data(b"NOOP\r\n")
    assert d.core.next_event() is None


def test_quit_refused_does_not_close() -> None:
    d = Dialogue()
    d.one(b"QUIT\r\n", lambda e: Reply(250, "no"))
    assert not d.core.closed


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"FOO\r\n", (500, "5.5.1")),
        (b"MAILFROM:<a@b.example>\r\n", (500, "5.5.1")),
        (b"\r\n", (500, "5.5.2")),
        (b"   \r\n", (500, "5.5.2")),
        (b"EXPN staff\r\n", (502, "5.5.1")),
        (b"\xff\xfe\r\n", (500, "5.5.1")),
        (b"NOOP \xff\r\n", (501, "5.5.2")),
        (b"NOOP a\x00b\r\n", (501, "5.5.4")),
    ],
)
def test_unknown_and_malformed_commands(line: bytes, expected: tuple[int, str]) -> None:
    d = Dialogue()
    assert rejected(d.one(line)) == expected
    assert d.core.error_count == 1


def test_error_count_counts_every_rejection() -> None:
    d = Dialogue()
    d.feed(b"FOO\r\nBAR\r\nNOOP\r\nMAIL FROM:<>\r\n")
    assert d.core.error_count == 3


# --- RFC 5321 §4.5.3.1.4: command line length -----------------------------------------


def test_command_line_limit_is_512_with_crlf() -> None:
    d = Dialogue()
    assert d.one(b"NOOP " + b"x" * 505 + b"\r\n") == Noop()  # 512 octets
    assert rejected(d.one(b"NOOP " + b"x" * 506 + b"\r\n")) == (500, "5.5.6")
    assert d.one(b"NOOP " + b"x" * 505 + b"\n") == Noop()  # bare LF: 511


def test_overlong_line_is_reported_once_and_discarded() -> None:
    d = Dialogue()
    events = d.feed(b"X" * 600)
    assert [rejected(e) for e in events] == [(500, "5.5.6")]
    assert d.core.buffered == 0
    assert d.feed(b"Y" * 100_000) == []
    assert d.core.buffered == 0
    assert d.feed(b"MAIL FROM:<evil@x.example>\r\nNOOP\r\n") == [Noop()]


def test_buffer_stays_bounded() -> None:
    d = Dialogue()
    for _ in range(50):
        d.feed(b"Z" * 65536)
        assert d.core.buffered <= 512
    assert d.core.error_count == 1


def test_auth_lines_may_be_longer() -> None:
    """RFC 4954 §4: AUTH lines and responses may be up to 12288 octets."""
    d = Dialogue().greeted()
    event = d.one(b"AUTH PLAIN " + b"A" * 4000 + b"\r\n", lambda e: Reply(334, ""))
    assert event == Auth("PLAIN", "A" * 4000)
    assert d.one(b"B" * 12000 + b"\r\n") == AuthResponse("B" * 12000)
    assert rejected(Dialogue().greeted().one(b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")) == (
        500,
        "5.5.6",
    )


# --- RFC 2920: PIPELINING ---------------------------------------------------------

PIPELINED = (
    b"EHLO c.example\r\n"
    b"MAIL FROM:<a@b.example> SIZE=100\r\n"
    b"RCPT TO:<c@d.example>\r\n"
    b"RCPT TO:<bad address>\r\n"
    b"RCPT TO:<e@d.example>\r\n"
    b"DATA\r\n"
    b"Subject: pipelined\r\n\r\n.line\r\n\r\n.\r\n"
    b"VRFY x\r\n"
    b"MAIL FROM:<>\r\n"
    b"RCPT TO:<postmaster>\r\n"
    b"DATA\r\n"
    b".\r\n"
    b"BOGUS\r\n"
    b"QUIT\r\n"
)


def test_pipelining_in_one_chunk() -> None:
    events = merged(Dialogue().feed(PIPELINED))
    assert events == [
        Hello("c.example", True),
        MailFrom(Address("a", "b.example"), 100, None, False, {"SIZE": "100"}),
        RcptTo(Address("c", "d.example"), {}),
        events[3],
        RcptTo(Address("e", "d.example"), {}),
        DataRequested(),
        DataChunk(b"Subject: pipelined\n\nline\n\n"),
        DataComplete(26, False, False, False, False),
        Verify("x"),
        MailFrom(None, None, None, False, {}),
        RcptTo(Address("postmaster", ""), {}),
        DataRequested(),
        DataComplete(0, False, False, False, False),
        events[13],
        Quit(),
    ]
    assert rejected(events[3]) == (501, "5.1.3")
    assert rejected(events[13]) == (500, "5.5.1")


def test_pipelining_byte_by_byte_gives_the_same_events() -> None:
    d = Dialogue()
    events: list[Event] = []
    for i in range(len(PIPELINED)):
        events += d.feed(PIPELINED[i : i + 1])
    assert merged(events) == merged(Dialogue().feed(PIPELINED))


def test_events_come_one_at_a_time() -> None:
    core = SmtpServerCore(1000)
    core.receive_data(b"NOOP\r\nNOOP\r\n")
    assert core.next_event() == Noop()
    with pytest.raises(LocalProtocolError):
        core.next_event()
    core.send(OK)
    assert core.next_event() == Noop()


def test_send_without_event_is_a_local_error() -> None:
    core = SmtpServerCore(1000)
    with pytest.raises(LocalProtocolError):
        core.send(OK)


def test_data_chunks_need_no_answer() -> None:
    d = Dialogue().in_transaction()
    d.feed(b"DATA\r\n")
    d.core.receive_data(b"abc\r\n")
    assert d.core.next_event() == DataChunk(b"abc")
    assert d.core.next_event() is None  # "\r\n" held back: it may be the end
    with pytest.raises(LocalProtocolError):
        d.core.send(OK)


# --- RFC 3207: STARTTLS -------------------------------------------------------------


@pytest.mark.abuse
def test_starttls_discards_pipelined_plaintext() -> None:
    """RFC 3207 §4.2: commands sent before the handshake are not acted upon."""
    d = Dialogue().greeted()
    events = d.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n")
    assert events == [StartTls()]
    assert d.core.tls and d.core.state is SmtpState.START
    assert d.core.discarded_after_starttls == len(
        b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\n"
    )
    assert d.core.next_event() is None
    # After the handshake the client must greet again.
    assert rejected(d.one(b"MAIL FROM:<a@b.example>\r\n")) == (503, "5.5.1")
    d.greeted()
    assert isinstance(d.one(b"MAIL FROM:<a@b.example>\r\n"), MailFrom)


def test_rejections_name_the_command_they_refuse() -> None:
    """For the session's tally (Postfix's ``mail=0/1``): a refused command
    keeps its verb; a line that is no command has none."""
    d = Dialogue()
    event = d.one(b"MAIL FROM:<a@b.example>\r\n")
    assert isinstance(event, Rejected) and event.command == "mail"
    event = d.one(b"XYZZY\r\n")
    assert isinstance(event, Rejected) and event.command == ""
    event = d.one(b"HELO \xff\r\n")
    assert isinstance(event, Rejected) and event.command == "helo"


def test_close_ends_the_dialogue_after_a_refused_starttls() -> None:
    """The session refuses a STARTTLS with data behind it (554) and closes:
    nothing buffered after it ever becomes an event."""
    d = Dialogue().greeted()
    d.core.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
    assert d.core.next_event() == StartTls()
    assert d.core.buffered > 0  # what the session sees before it answers
    d.core.send(Reply(554, "Nothing may follow STARTTLS before the handshake", "5.5.1"))
    d.core.close()
    assert d.core.closed and d.core.next_event() is None and not d.core.tls


def test_starttls_resets_transaction_and_authentication() -> None:
    d = Dialogue().greeted()
    d.one(b"AUTH PLAIN AGFsaWNlAHB3\r\n")
    assert d.core.authenticated
    d.one(b"STARTTLS\r\n")
    assert not d.core.authenticated and not d.core.greeted


def test_starttls_twice_or_with_argument() -> None:
    d = Dialogue().greeted()
    assert rejected(d.one(b"STARTTLS now\r\n")) == (501, "5.5.4")
    d.one(b"STARTTLS\r\n")
    assert rejected(d.one(b"STARTTLS\r\n")) == (503, "5.5.1")


def test_implicit_tls() -> None:
    """RFC 8314 §3.3: on port 465 TLS is on from the start; STARTTLS is out of sequence."""
    core = SmtpServerCore(1000, tls=True)
    assert core.tls
    core.receive_data(b"EHLO c\r\nSTARTTLS\r\n")
    assert core.next_event() == Hello("c", True)
    core.send(OK)
    event = core.next_event()
    assert isinstance(event, Rejected) and event.reply.code == 503


def test_starttls_refused_keeps_plaintext_commands() -> None:
    d = Dialogue().greeted()
    events = d.feed(b"STARTTLS\r\nNOOP\r\n", lambda e: Reply(454, "TLS not available", "4.7.0"))
    assert events == [StartTls(), Noop()]
    assert not d.core.tls


# --- RFC 4954: AUTH ---------------------------------------------------------------


def test_auth_with_initial_response() -> None:
    d = Dialogue().greeted()
    assert d.one(b"AUTH plain AGFsaWNlAHB3\r\n") == Auth("PLAIN", "AGFsaWNlAHB3")
    assert d.core.authenticated
    assert rejected(d.one(b"AUTH PLAIN AGFsaWNlAHB3\r\n")) == (503, "5.5.1")


def test_auth_exchange_lines_are_not_commands() -> None:
    d = Dialogue().greeted()
    assert d.one(b"AUTH LOGIN\r\n") == Auth("LOGIN", None)
    assert d.core.state is SmtpState.AUTH
    answers = iter([Reply(334, "UGFzc3dvcmQ6"), Reply(235, "Ok", "2.7.0")])
    assert d.feed(b"QUIT\r\nMAIL FROM:<>\r\n", lambda e: next(answers)) == [
        AuthResponse("QUIT"),
        AuthResponse("MAIL FROM:<>"),
    ]
    assert d.core.authenticated and d.core.state is SmtpState.GREETED


def test_auth_cancel_and_failure_end_the_exchange() -> None:
    d = Dialogue().greeted()
    d.one(b"AUTH PLAIN\r\n")
    assert d.one(b"*\r\n") == AuthResponse("*")
    assert d.core.state is SmtpState.GREETED and not d.core.authenticated
    d.one(b"AUTH PLAIN\r\n")
    d.one(b"AGJvYgB3cm9uZw==\r\n", lambda e: Reply(535, "invalid", "5.7.8"))
    assert d.one(b"NOOP\r\n") == Noop()
    assert not d.core.authenticated


def test_auth_pipelined_with_its_response() -> None:
    events = Dialogue().feed(b"EHLO c\r\nAUTH PLAIN\r\nAGFsaWNlAHB3\r\nNOOP\r\n")
    assert events == [Hello("c", True), Auth("PLAIN", None), AuthResponse("AGFsaWNlAHB3"), Noop()]


@pytest.mark.parametrize(
    ("setup", "line", "expected"),
    [
        (b"", b"AUTH PLAIN\r\n", (503, "5.5.1")),  # before EHLO
        (b"EHLO c\r\nMAIL FROM:<>\r\n", b"AUTH PLAIN\r\n", (503, "5.5.1")),
        (b"EHLO c\r\n", b"AUTH\r\n", (501, "5.5.2")),
        (b"EHLO c\r\n", b"AUTH PL@IN\r\n", (501, "5.5.2")),
        (b"EHLO c\r\n", b"AUTH PLAIN a b\r\n", (501, "5.5.2")),
    ],
)
def test_auth_errors(setup: bytes, line: bytes, expected: tuple[int, str]) -> None:
    d = Dialogue()
    d.feed(setup)
    assert rejected(d.one(line)) == expected


def test_overlong_auth_response_ends_the_exchange() -> None:
    d = Dialogue().greeted()
    d.one(b"AUTH PLAIN\r\n")
    assert rejected(d.one(b"A" * 13000 + b"\r\n")) == (500, "5.5.6")
    assert d.one(b"NOOP\r\n") == Noop()


# --- 421 ----------------------------------------------------------------------------


def test_unsolicited_421_closes() -> None:
    core = SmtpServerCore(1000)
    core.receive_data(b"NOOP\r\n")
    assert core.send_unsolicited(Reply(421, "timeout", "4.4.2")) == b"421 4.4.2 timeout\r\n"
    assert core.closed and core.next_event() is None


# --- properties -------------------------------------------------------------------

_WORDS = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN dXNlcg==\r\n",
    b"*\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"..x\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"text",
    b"X" * 300,
]
sessions = st.lists(st.sampled_from(_WORDS), max_size=40).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def _no_tls(event: Event) -> Reply:
    # An accepted STARTTLS discards whatever happens to be buffered, which
    # depends on how the input was split; refusing it keeps the property.
    if isinstance(event, StartTls):
        return Reply(454, "TLS not available", "4.7.0")
    return default_answer(event)


def _events(chunks: list[bytes]) -> list[Event]:
    d = Dialogue(_no_tls)
    events: list[Event] = []
    for chunk in chunks:
        events += d.feed(chunk)
    return merged(events)


@settings(max_examples=300)
@given(data=sessions, cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_any_split_gives_the_same_events(data: bytes, cuts: list[int]) -> None:
    assert _events(_split(data, cuts)) == _events([data])


@settings(max_examples=100)
@given(data=sessions)
def test_byte_by_byte_gives_the_same_events(data: bytes) -> None:
    assert _events([data[i : i + 1] for i in range(len(data))]) == _events([data])


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_only_produce_events(chunks: list[bytes]) -> None:
    d = Dialogue()
    for chunk in chunks:
        for event in d.feed(chunk):
            assert isinstance(event, typing.get_args(Event))
        assert d.core.buffered <= 13000


# --- CHUNKING (RFC 3030) ---------------------------------------------------------------


def test_bdat_reads_exactly_the_count_then_commands_again() -> None:
    d = Dialogue().in_transaction()
    events = merged(d.feed(b"BDAT 7\r\nab\r\n.\r\nBDAT 3 LAST\r\nc\r\nNOOP\r\n"))
    assert events[0] == ChunkStart(7, False)
    assert events[1] == DataChunk(b"ab\n.\n")  # no dot-unstuffing, no end of data
    assert isinstance(events[2], ChunkComplete) and not events[2].last
    assert events[3] == ChunkStart(3, True)
    assert events[4] == DataChunk(b"c\n")
    assert isinstance(events[5], ChunkComplete) and events[5].content.size == 7
    assert events[6] == Noop()
    assert d.core.state is SmtpState.GREETED


def test_bdat_refused_without_mail_after_its_chunk_is_read() -> None:
    d = Dialogue().greeted()
    d.core.receive_data(b"BDAT 8 LAST\r\nQUIT\r\n")
    assert d.core.next_event() is None  # the chunk is not complete yet: no answer
    d.core.receive_data(b"\r\nNOOP\r\n")
    events = d.feed(b"")
    assert rejected(events[0]) == (503, "5.5.1")
    assert events[1:] == [Noop()]


def test_bdat_chunk_over_the_limit_is_consumed_and_flagged() -> None:
    d = Dialogue(max_message_size=10).in_transaction()
    events = merged(d.feed(b"BDAT 30\r\n" + b"x" * 28 + b"\r\nNOOP\r\n"))
    assert events[1] == DataChunk(b"x" * 10)  # never more than the limit is emitted
    assert isinstance(events[2], ChunkComplete) and events[2].content.oversize
    assert events[3] == Noop()


def test_refused_chunk_ends_the_transaction_and_data_after_bdat_is_refused() -> None:
    d = Dialogue().in_transaction()
    d.feed(b"BDAT 2\r\nab")
    assert d.core.chunking
    assert rejected(d.one(b"DATA\r\n")) == (503, "5.5.1")
    events = d.feed(b"BDAT 1\r\nc", lambda e: Reply(452, "no", "4.3.1"))
    assert isinstance(events[-1], ChunkComplete)
    assert not d.core.in_transaction and not d.core.chunking


def test_bdat_with_unreadable_count_closes() -> None:
    d = Dialogue().in_transaction()
    assert rejected(d.one(b"BDAT x LAST\r\n")) == (501, "5.5.4")
    assert d.core.closed
