"""The ManageSieve command reader (RFC 5804 §4): strings, literals, bounds, fuzzing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol.managesieve import (
    BadCommand,
    Command,
    Event,
    ManageSieveServer,
    quote,
    response,
)


def events(core: ManageSieveServer, data: bytes) -> list[Event]:
    core.receive_data(data)
    out: list[Event] = []
    while (event := core.next_command()) is not None:
        out.append(event)
    return out


def test_atoms_quoted_strings_and_numbers() -> None:
    core = ManageSieveServer()
    assert events(core, b'capability\r\nHAVESPACE "my \\"s\\"" 1024\r\n') == [
        Command("CAPABILITY", ()),
        Command("HAVESPACE", ('my "s"', 1024)),
    ]


def test_literals_with_and_without_plus_even_split_across_reads() -> None:
    core = ManageSieveServer()
    assert events(core, b'PUTSCRIPT "a" {7+}\r\nkee') == []
    assert events(core, b"p;\r\n\r\nCHECKSCRIPT {5}\r\nkeep;\r\n") == [
        Command("PUTSCRIPT", ("a", "keep;\r\n")),
        Command("CHECKSCRIPT", ("keep;",)),
    ]


def test_a_too_large_literal_is_skipped_not_held() -> None:
    core = ManageSieveServer(max_literal=10)
    assert events(core, b'PUTSCRIPT "a" {20+}\r\n0123456789') == []
    assert events(core, b"0123456789\r\nNOOP\r\n") == [
        BadCommand("literal too large", "QUOTA/MAXSIZE"),
        Command("NOOP", ()),
    ]


def test_long_lines_and_many_arguments_are_refused() -> None:
    core = ManageSieveServer(max_line=50)
    assert events(core, b"NOOP " + b"x" * 60) == [BadCommand("line too long")]
    assert events(core, b"\r\nNOOP\r\n")[-1] == Command("NOOP", ())
    core = ManageSieveServer()
    assert events(core, b"NOOP" + b' "a"' * 20 + b"\r\n") == [BadCommand("too many arguments")]


def test_bad_syntax() -> None:
    core = ManageSieveServer()
    assert events(core, b'NOOP "open\r\n{x}\r\n"\xff"\r\n') == [
        BadCommand("unterminated quoted string"),
        BadCommand("bad literal length"),
        BadCommand("string is not UTF-8"),
    ]


def test_sasl_responses_are_one_string() -> None:
    core = ManageSieveServer()
    core.expect_sasl_response = True
    assert events(core, b'"AGFAYgBj"\r\n') == [Command("", ("AGFAYgBj",))]


def test_replies() -> None:
    assert response("OK") == b"OK\r\n"
    assert response("NO", "No such script", "NONEXISTENT") == (
        b'NO (NONEXISTENT) "No such script"\r\n'
    )
    assert quote('a"b') == b'{3}\r\na"b'


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_fuzz_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    core = ManageSieveServer(max_line=200, max_literal=100)
    for chunk in chunks:
        for event in events(core, chunk):
            assert isinstance(event, Command | BadCommand)
        # a line, its literals (at most nine arguments), one more chunk
        assert len(core._buffer) <= 200 + 9 * (100 + 200) + 40
