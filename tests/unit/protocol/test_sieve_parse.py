"""The bounded Sieve parser: RFC 5228 §8 grammar, limits, errors with line/column."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice.protocol.sieve_parse import (
    Command,
    SieveLimits,
    SieveSyntaxError,
    Tag,
    parse_script,
)


def test_commands_tests_and_blocks() -> None:
    script = parse_script(
        b'require ["fileinto"];\r\n'
        b'if allof (header :contains "Subject" "x", not exists "y") {\r\n'
        b'  fileinto "Junk"; stop;\r\n'
        b"} else { keep; }\r\n"
    )
    assert [c.name for c in script] == ["require", "if", "else"]
    assert script[0].arguments == (("fileinto",),)
    test = script[1].tests[0]
    assert test.name == "allof"
    assert [t.name for t in test.tests] == ["header", "not"]
    assert test.tests[0].arguments == (Tag("contains"), ("Subject",), ("x",))
    assert test.tests[1].tests[0].arguments == (("y",),)
    assert script[1].block is not None
    assert [c.name for c in script[1].block] == ["fileinto", "stop"]
    assert script[2].block == (Command("keep", (), (), None, 4, 10),)


def test_numbers_take_quantifiers() -> None:
    (cmd,) = parse_script(b"if size :over 1K { discard; }")
    assert cmd.tests[0].arguments == (Tag("over"), 1024)
    (cmd,) = parse_script(b"if size :under 2m { discard; }")
    assert cmd.tests[0].arguments[1] == 2 << 20
    (cmd,) = parse_script(b"if size :under 1G { discard; }")
    assert cmd.tests[0].arguments[1] == 1 << 30


def test_quoted_string_escapes() -> None:
    (cmd,) = parse_script(b'fileinto "a\\"b\\\\c\\d";')
    assert cmd.arguments == (('a"b\\cd',),)


def test_quoted_string_may_span_lines() -> None:
    (cmd,) = parse_script(b'reject "two\r\nlines";')
    assert cmd.arguments == (("two\r\nlines",),)


def test_multiline_text_unstuffs_dots_and_allows_a_comment() -> None:
    (cmd,) = parse_script(b"vacation text: # why\r\nAway.\r\n..leading dot\r\n.\r\n;")
    assert cmd.arguments == (("Away.\r\n.leading dot\r\n",),)


def test_comments_are_ignored() -> None:
    script = parse_script(b"# a\n/* b\n c */ keep; # d\n")
    assert [c.name for c in script] == ["keep"]


def test_names_and_tags_are_case_insensitive() -> None:
    (cmd,) = parse_script(b'IF Header :IS "a" "b" { KEEP; }')
    assert cmd.name == "if"
    assert cmd.tests[0].name == "header"
    assert cmd.tests[0].arguments[0] == Tag("is")


@pytest.mark.parametrize(
    ("script", "line", "column", "reason"),
    [
        (b"keep", 1, 5, "unexpected end"),
        (b'keep;\n  fileinto "x"\n', 3, 1, "unexpected end"),
        (b'keep;\nfileinto "x" }', 2, 14, "expected ';' or '{'"),
        (b"keep; }", 1, 7, "unexpected '}'"),
        (b"if true { keep;", 1, 16, "unexpected end"),
        (b'fileinto "abc', 1, 10, "unterminated quoted"),
        (b"/* never closed", 1, 1, "unterminated /*"),
        (b"vacation text:\nno end\n", 1, 10, "unterminated text"),
        (b'fileinto ["a" "b"];', 1, 15, "expected ',' or ']'"),
        (b"if anyof (true; false) {}", 1, 15, "expected ',' or ')'"),
        (b"keep: ;", 1, 5, "':' must begin a tag"),
        (b"keep @;", 1, 6, "unexpected character"),
        (b"if size :over 99999999999999999999 {}", 1, 15, "too large"),
        (b"if size :over 9999999999G {}", 1, 15, "too large"),
        (b"keep;\n\xff", 2, 1, "not UTF-8"),
    ],
)
def test_errors_say_where(script: bytes, line: int, column: int, reason: str) -> None:
    with pytest.raises(SieveSyntaxError) as info:
        parse_script(script)
    assert reason in info.value.reason
    assert (info.value.line, info.value.column) == (line, column)


def test_script_size_is_bounded() -> None:
    limits = SieveLimits(max_bytes=100)
    parse_script(b"keep;" * 20, limits)
    with pytest.raises(SieveSyntaxError, match="larger than 100 bytes"):
        parse_script(b"keep;" * 21, limits)


def test_block_nesting_is_bounded() -> None:
    limits = SieveLimits(max_depth=5)
    ok = b"if true {" * 5 + b"keep;" + b"}" * 5
    parse_script(ok, limits)
    with pytest.raises(SieveSyntaxError, match="nesting too deep"):
        parse_script(b"if true {" * 6 + b"keep;" + b"}" * 6, limits)


def test_test_nesting_is_bounded_far_below_python_recursion() -> None:
    # 100 000 "not" would blow Python's stack in a naive recursive parser.
    deep = b"if " + b"not " * 100_000 + b"true { keep; }"
    with pytest.raises(SieveSyntaxError, match="nesting too deep"):
        parse_script(deep, SieveLimits(max_bytes=1 << 20, max_tokens=1 << 20))
    nested_lists = b"if " + b"anyof(" * 50_000 + b"true" + b")" * 50_000 + b"{}"
    with pytest.raises(SieveSyntaxError, match="nesting too deep"):
        parse_script(nested_lists, SieveLimits(max_bytes=1 << 20, max_tokens=1 << 20))


def test_token_count_is_bounded() -> None:
    with pytest.raises(SieveSyntaxError, match="too many tokens"):
        parse_script(b"keep;" * 100, SieveLimits(max_tokens=150))


_ATOMS = st.sampled_from(
    [
        b"if",
        b"keep",
        b";",
        b"{",
        b"}",
        b"(",
        b")",
        b"[",
        b"]",
        b",",
        b":is",
        b'"a"',
        b"text:\n",
        b".\n",
        b"1K",
        b"#c\n",
        b"/*",
        b"*/",
        b"\\",
        b'"',
        b" ",
        b"\n",
        b"allof",
        b"not",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_ATOMS, st.binary(max_size=8)), max_size=60))
def test_fuzz_only_parses_or_raises_syntax_error(parts: list[bytes]) -> None:
    try:
        parse_script(b"".join(parts))
    except SieveSyntaxError as exc:
        assert exc.line >= 1
        assert exc.column >= 1
