"""The Sieve interpreter: checked scripts against plain message values -> actions."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol.sieve_parse import SieveSyntaxError, parse_script
from postoffice.protocol.sieve_run import (
    FileInto,
    Keep,
    Redirect,
    Reject,
    RunLimits,
    SieveCheckError,
    SieveMessage,
    SieveResult,
    SieveRuntimeError,
    Vacation,
    check_script,
    run_script,
)

MESSAGE = SieveMessage(
    headers=(
        ("From", "Alice <alice+lists@example.org>"),
        ("To", "bob@example.com, carol@example.net"),
        ("Subject", "Weekly Report: sales"),
        ("X-Spam-Score", "12.5"),
        ("Received", "a"),
        ("Received", "b"),
        ("Date", "Sat, 02 Mar 2024 23:30:00 -0100"),
    ),
    size=2048,
    envelope_from="alice+lists@example.org",
    envelope_to="bob+work@example.com",
    body_text="Hello Bob,\r\nthe numbers are in.\r\n",
    spam_score=12.5,
    now=1_700_000_000.0,  # 2023-11-14T22:13:20Z, a Tuesday
    mailbox_exists=lambda name: name == "Archive",
)


def run(
    script: str, message: SieveMessage = MESSAGE, limits: RunLimits | None = None
) -> SieveResult:
    return run_script(parse_script(script.encode()), message, limits)


def test_empty_script_keeps() -> None:
    assert run("").actions == (Keep(),)


def test_fileinto_cancels_implicit_keep_but_copy_does_not() -> None:
    req = 'require ["fileinto", "copy"];\n'
    assert run(req + 'fileinto "Work";').actions == (FileInto("Work"),)
    assert run(req + 'fileinto :copy "Work";').actions == (FileInto("Work"), Keep())


def test_discard_and_stop() -> None:
    result = run("discard; stop; keep;")
    assert result.actions == ()
    assert result.discarded


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ('header :is "subject" "weekly report: sales"', True),
        ('header :is :comparator "i;octet" "subject" "weekly report: sales"', False),
        ('header :contains "Subject" "REPORT"', True),
        ('header :matches "subject" "Weekly*: ?ales"', True),
        ('header :matches "subject" "Weekly"', False),
        ('address :domain "to" "example.net"', True),
        ('address :localpart "from" "alice+lists"', True),
        ('address :all :is "from" "alice+lists@example.org"', True),
        ('address :user "from" "alice"', True),
        ('address :detail "from" "lists"', True),
        ('envelope :detail "to" "work"', True),
        ('envelope :domain "from" "example.org"', True),
        ('exists ["From", "Subject"]', True),
        ('exists ["From", "X-None"]', False),
        ("size :over 1K", True),
        ("size :under 1K", False),
        ("allof (true, not false)", True),
        ("anyof (false, not true)", False),
        ('header :count "ge" :comparator "i;ascii-numeric" "received" "2"', True),
        ('header :value "gt" :comparator "i;ascii-numeric" "x-spam-score" "10"', True),
        ('body :contains "numbers"', True),
        ('spamtest :value "ge" :comparator "i;ascii-numeric" "8"', True),
        ('mailboxexists "Archive"', True),
        ('mailboxexists "Nope"', False),
        ('date :is "date" "date" "2024-03-03"', True),
        ('date :zone "-0100" :is "date" "time" "23:30:00"', True),
        ('date :originalzone :is "date" "zone" "-0100"', True),
        ('date :is "date" "weekday" "0"', True),
        ('date :value "le" "date" "year" "2025"', True),
        ('date :value "ge" "date" "year" "2025"', False),
        ('date :is "x-none" "year" "2024"', False),
        ('currentdate :is "iso8601" "2023-11-14T22:13:20+00:00"', True),
        ('currentdate :zone "+0200" :is "weekday" "3"', True),
        ('currentdate :value "lt" :comparator "i;ascii-numeric" "julian" "60263"', True),
    ],
)
def test_tests(test: str, expected: bool) -> None:
    script = (
        'require ["envelope", "subaddress", "relational", "comparator-i;ascii-numeric",'
        ' "body", "spamtest", "mailbox", "fileinto", "date"];\n'
        f'if {test} {{ fileinto "Hit"; }}'
    )
    assert (run(script).actions == (FileInto("Hit"),)) is expected


def test_if_elsif_else_takes_one_branch() -> None:
    script = (
        'require "fileinto";\n'
        'if false { fileinto "A"; } elsif true { fileinto "B"; } else { fileinto "C"; }\n'
        'if false { fileinto "D"; } else { fileinto "E"; }'
    )
    assert run(script).actions == (FileInto("B"), FileInto("E"))


def test_flags_and_variables() -> None:
    script = (
        'require ["imap4flags", "fileinto", "variables"];\n'
        'addflag "\\\\Seen";\n'
        'if header :matches "subject" "Weekly *: *" { set :upper "kind" "${2}"; }\n'
        'fileinto :flags "\\\\Flagged" "Reports/${kind}";\n'
        "keep;"
    )
    assert run(script).actions == (
        FileInto("Reports/SALES", ("\\Flagged",)),
        Keep(("\\Seen",)),
    )


def test_redirect_reject_vacation() -> None:
    assert run('redirect "x@example.net";').actions == (Redirect("x@example.net"),)
    assert run('require "reject"; reject "no";').actions == (Reject("no", False),)
    (vac, keep) = run(
        'require "vacation";\nvacation :days 3 :subject "Away" :addresses ["b@x"] "Gone";'
    ).actions
    assert isinstance(vac, Vacation)
    assert (vac.days, vac.subject, vac.addresses, vac.reason) == (3, "Away", ("b@x",), "Gone")
    assert keep == Keep()


def test_redirects_per_message_are_bounded() -> None:
    script = 'redirect "a@x"; redirect "b@x"; redirect "c@x";'
    with pytest.raises(SieveRuntimeError, match="too many redirects"):
        run(script, limits=RunLimits(max_redirects=2))


def test_actions_are_bounded() -> None:
    script = 'require ["fileinto", "copy"];' + 'fileinto :copy "x";' * 40
    with pytest.raises(SieveRuntimeError, match="too many actions"):
        run(script)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ('fileinto "x";', "needs require 'fileinto'"),
        ('require "nosuch";', "unsupported extension"),
        ('keep; require "fileinto";', "require must come first"),
        ("frobnicate;", "unknown command"),
        ("if bogus { keep; }", "unknown test"),
        ("else { keep; }", "else without if"),
        ("keep { }", "block misplaced"),
        ('if header :count "gt" "a" "1" { keep; }', "relational"),
    ],
)
def test_check_refuses(script: str, reason: str) -> None:
    with pytest.raises(SieveCheckError, match=reason):
        check_script(parse_script(script.encode()))


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ('require "fileinto"; fileinto;', "fileinto: wrong number of arguments"),
        ("redirect 5;", "a number where a string belongs"),
        ('if size :over "big" { keep; }', "size takes a number"),
        ("if not (true, false) { keep; }", "not: wrong number of tests"),
        ("if allof () { keep; }", "expected a test name"),
        ('require "relational"; if header :count "x" "a" { keep; }', "relation"),
    ],
)
def test_check_refuses_wrong_shapes(script: str, reason: str) -> None:
    with pytest.raises((SieveCheckError, SieveSyntaxError), match=reason):
        check_script(parse_script(script.encode()))


_WORDS = [
    "require", '"fileinto"', '["variables", "relational", "imap4flags", "date"]', "if", "elsif",
    "else", "{", "}", ";", "(", ")", ",", "header", "address", "size", "exists", "not", "allof",
    "anyof", "true", "false", ":is", ":contains", ":matches", ":count", ":value", '"gt"',
    ":comparator", '"i;ascii-numeric"', ":over", "1K", '"subject"', '"*x?"', '"${1}"',
    "keep", "discard", "stop", "fileinto", "redirect", '"a@b"', "set", "addflag", "hasflag",
    "date", "currentdate", '"year"', ":zone", '"+0100"', ":domain", "string", "[", "]",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=40))
def test_fuzz_checked_scripts_fail_only_as_script_errors(words: list[str]) -> None:
    try:
        commands = parse_script(" ".join(words).encode())
        check_script(commands)
    except (SieveSyntaxError, SieveCheckError):
        return
    with contextlib.suppress(SieveRuntimeError):
        run_script(commands, MESSAGE)


BODIES = SieveMessage(
    headers=(("Subject", "parts"),),
    size=100,
    envelope_from="a@example.org",
    envelope_to="b@example.org",
    body_text="decoded text",
    body_raw="ZGVjb2RlZCB0ZXh0 <b>raw</b>",
    body_parts=(
        ("multipart/mixed", "the prologue"),
        ("text/plain", "decoded text"),
        ("text/html", "<b>html part</b>"),
        ("application/pdf", "%PDF binary"),
    ),
)


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ('body :raw :contains "ZGVjb2RlZCB0ZXh0"', True),
        ('body :raw :contains "decoded text"', False),
        ('body :text :contains "decoded text"', True),
        ('body :contains "decoded text"', True),  # :text is the default (RFC 5173 §5)
        ('body :content "text/html" :contains "html part"', True),
        ('body :content "text/plain" :contains "html part"', False),
        ('body :content "text" :contains "html part"', True),  # any subtype
        ('body :content "" :contains "%PDF"', True),  # every part
        ('body :content ["image", "application/pdf"] :contains "%PDF"', True),
        ('body :content "multipart" :contains "prologue"', True),
        ('body :content "text/" :contains "html"', False),  # RFC 5173 §5.2: matches nothing
        ('body :content "text/html/x" :contains "html"', False),
        ('body :content "TEXT/HTML" :matches "*html*"', True),
    ],
)
def test_body_transforms(test: str, expected: bool) -> None:
    result = run(f'require ["body", "fileinto"];\nif {test} {{ fileinto "Hit"; }}\n', BODIES)
    assert (result.actions[0] == FileInto("Hit")) is expected


def test_body_content_needs_its_type_list() -> None:
    with pytest.raises(SieveCheckError):
        check_script(parse_script(b'require "body";\nif body :content :contains "x" { stop; }\n'))
