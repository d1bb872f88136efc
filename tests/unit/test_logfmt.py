"""logfmt.field: a client's value is one log field, whatever it holds."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from postoffice import logfmt

EXAMPLES = int(os.environ.get("POSTOFFICE_FUZZ_EXAMPLES", "200"))


def test_ordinary_values_stay_as_they_are() -> None:
    for value in ("alice@example.test", "<a+tag@b.test>", "127.0.0.1", "jörg@bücher.test", "-"):
        assert logfmt.field(value) == value


def test_odd_values_are_json_strings() -> None:
    assert logfmt.field("x client=evil") == '"x client=evil"'
    assert logfmt.field('a"b') == '"a\\"b"'
    assert logfmt.field("a=b") == '"a=b"'
    assert logfmt.field("") == '""'
    assert logfmt.field("a\r\nb\x00") == '"a\\r\\nb\\u0000"'
    assert logfmt.field("a\u2028b\u0085") == '"a\\u2028b\\u0085"'
    assert logfmt.field("a\udcffb") == '"a\\udcffb"'  # undecodable bytes from the wire


def test_paths() -> None:
    assert logfmt.path(None) == "<>"
    assert logfmt.path("a@b.test") == "<a@b.test>"
    assert logfmt.path('"x y"@b.test') == '"<\\"x y\\"@b.test>"'
    assert logfmt.paths(["a@b.test", "c@d.test"]) == "<a@b.test>,<c@d.test>"


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text())
def test_any_value_is_one_printable_field_that_reads_back(text: str) -> None:
    out = logfmt.field(text)
    if out.startswith('"'):
        assert out.isascii() and out.isprintable()
        assert json.loads(out) == text
    else:
        assert out == text and out.isprintable() and not set(out) & set(' ="')
    assert len(out.splitlines()) == 1


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True), st.text(), max_size=6))
def test_a_record_of_fields_parses_back_exactly(values: dict[str, str]) -> None:
    """``parse``, the reader of what ``field`` writes (postoffice trace): no
    value, however odd, adds a field or loses one."""
    record = "event " + " ".join(f"{k}={logfmt.field(v)}" for k, v in values.items())
    assert logfmt.parse(record) == (["event"], values)


def test_parse_keeps_the_first_of_a_repeated_key_and_bare_words() -> None:
    words, fields = logfmt.parse('deferred id=1 to=<a@b> 2.0.0 to=<forged> reply="x y"')
    assert words == ["deferred", "2.0.0"]
    assert fields == {"id": "1", "to": "<a@b>", "reply": "x y"}
